"""Reward scoring, N=8 candidates x K=10 draws: the naive loop against the scorer.

naive: per candidate, per draw, batch 1, fp32, eager (as a literal reading of the formula).
fast:  ImplicitRewardScorer: all 80 noised latents in one micro-batch, channels_last,
       inference mode, the fused paired_mse; variants in fp32, bf16, and compiled.
extra_info: candidates_per_s; the adaptive race adds unet_forwards and its agreement with
the full search over several prompts.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from bench_utils import sync
from diffusers import DDPMScheduler

from sail_fast.diffusion.architectures import UNET_CONFIGS, build_unet, random_conditioning
from sail_fast.reward.scorer import ImplicitRewardScorer

N, K, BETA = 8, 10, 5000.0


@pytest.fixture(scope="module")
def models(arch, device):
    reference = build_unet(arch, device=device).eval()
    policy = copy.deepcopy(reference)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen).to(device))
    side = UNET_CONFIGS[arch]["sample_size"]
    latents = torch.randn(N, 4, side, side, generator=gen).to(device)
    timesteps = torch.randint(0, 1000, (K,), generator=gen).to(device)
    noise = torch.randn(K, 4, side, side, generator=gen).to(device)
    embeds, added = random_conditioning(arch, 1, device=device)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return policy, reference, scheduler, latents, timesteps, noise, embeds, added


@torch.inference_mode()
def naive_score(policy, reference, scheduler, latents, timesteps, noise, embeds, added):
    rewards = []
    for n in range(latents.shape[0]):
        gaps = []
        for k in range(timesteps.shape[0]):
            t = timesteps[k : k + 1]
            x_t = scheduler.add_noise(latents[n : n + 1], noise[k : k + 1], t)
            kw = dict(encoder_hidden_states=embeds, added_cond_kwargs=added)
            gaps.append(
                F.mse_loss(policy(x_t, t, **kw).sample, noise[k : k + 1])
                - F.mse_loss(reference(x_t, t, **kw).sample, noise[k : k + 1])
            )
        rewards.append(-BETA / 2 * torch.stack(gaps).mean())
    return torch.stack(rewards)


VARIANTS = {
    "naive": None,
    "fast-fp32": (torch.float32, False),
    "fast-bf16": (torch.bfloat16, False),
    "fast-fp32-compiled": (torch.float32, True),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_reward_scoring(benchmark, models, device, variant):
    policy, reference, scheduler, latents, timesteps, noise, embeds, added = models
    benchmark.group = "reward scoring N=8 x K=10"
    if variant == "naive":
        run = lambda: naive_score(policy, reference, scheduler, latents, timesteps, noise, embeds, added)  # noqa: E731
    else:
        dtype, compiled = VARIANTS[variant]
        pol, ref = copy.deepcopy(policy).to(dtype), copy.deepcopy(reference).to(dtype)
        scorer = ImplicitRewardScorer(pol, ref, scheduler, beta=BETA, num_draws=K, micro_batch=N * K, compile=compiled)
        cond = None if added is None else {k: v.to(dtype) for k, v in added.items()}
        run = lambda: scorer.score(latents, embeds.to(dtype), added_cond_kwargs=cond, timesteps=timesteps, noise=noise)  # noqa: E731

    def timed():
        out = run()
        sync(device)
        return out

    rewards = benchmark.pedantic(timed, rounds=3, iterations=1, warmup_rounds=1)
    assert torch.isfinite(rewards).all()
    benchmark.extra_info["candidates_per_s"] = N / benchmark.stats.stats.median


def test_adaptive_race_forwards_and_agreement(benchmark, models, device):
    policy, reference, scheduler, _, _, _, embeds, added = models
    benchmark.group = "reward scoring: adaptive race"
    scorer = ImplicitRewardScorer(policy, reference, scheduler, beta=BETA, num_draws=K, micro_batch=N * K)
    side = reference.config.sample_size
    prompts = 6
    latents = torch.randn(prompts, N, 4, side, side, generator=torch.Generator().manual_seed(1)).to(device)
    embeds_p = embeds.expand(prompts, -1, -1)
    added_p = None if added is None else {k: v.expand(prompts, *v.shape[1:]) for k, v in added.items()}
    draws = scorer.sample_draws(prompts, tuple(latents.shape[2:]), generator=torch.Generator().manual_seed(2))
    kw = dict(added_cond_kwargs=added_p, timesteps=draws.timesteps, noise=draws.noise)
    full = scorer.best_worst(latents, embeds_p, **kw)
    race = benchmark.pedantic(lambda: scorer.best_worst(latents, embeds_p, adaptive=True, **kw), rounds=1, iterations=1)
    agree = ((race.best == full.best).float().mean() + (race.worst == full.worst).float().mean()) / 2
    benchmark.extra_info.update(
        unet_forwards=race.unet_forwards,
        unet_forwards_full=full.unet_forwards_full,
        forwards_saved=1 - race.unet_forwards / full.unet_forwards_full,
        agreement_with_full=float(agree),
    )


@pytest.mark.parametrize("layout", ["lora-one-unet", "lora-two-unets"])
def test_reward_scoring_lora_policy(benchmark, models, device, layout):
    """A LoRA policy against the base: one UNet switching its adapter on and off (what a LoRA run does),
    against the adapter merged into a second UNet. extra_info: candidates_per_s and the UNet weight bytes held."""
    from sail_fast.diffusion.lora import POLICY, AdapterView, adapter_parameters, add_policy_adapter, merged_unet
    from sail_fast.runs.config import LoraSettings

    _, reference, scheduler, latents, timesteps, noise, embeds, added = models
    benchmark.group = "reward scoring N=8 x K=10, LoRA policy"
    unet = add_policy_adapter(copy.deepcopy(reference), LoraSettings(rank=8))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter_parameters(unet, POLICY):
            p.add_(0.01 * torch.randn(p.shape, generator=gen).to(device))
    if layout == "lora-one-unet":
        policy, base = AdapterView(unet, POLICY), AdapterView(unet, None)
        held = sum(p.numel() * p.element_size() for p in unet.parameters())
    else:
        policy, base = merged_unet(unet).to(device), copy.deepcopy(reference)
        held = 2 * sum(p.numel() * p.element_size() for p in reference.parameters())
    scorer = ImplicitRewardScorer(policy, base, scheduler, beta=BETA, num_draws=K, micro_batch=N * K)

    def timed():
        out = scorer.score(latents, embeds, added_cond_kwargs=added, timesteps=timesteps, noise=noise)
        sync(device)
        return out

    rewards = benchmark.pedantic(timed, rounds=3, iterations=1, warmup_rounds=1)
    assert torch.isfinite(rewards).all() and rewards.abs().max() > 0
    benchmark.extra_info.update(candidates_per_s=N / benchmark.stats.stats.median, unet_weight_bytes=held)
