"""Model FLOP utilisation: FLOPs counted with torch.utils.flop_counter.FlopCounterMode on an
eager run, divided by the fast path's time, against a dense matmul of the same dtype timed in
the same test (the machine's practical peak).

extra_info: model_flops, achieved_flops_per_s, matmul_flops_per_s, mfu.
"""

import copy
import time

import pytest
import torch
from bench_utils import sync
from diffusers import DDPMScheduler
from torch.utils.flop_counter import FlopCounterMode
from train_step_variants import NaiveStep, make_step

from sail_fast.diffusion.architectures import UNET_CONFIGS, build_unet, random_conditioning
from sail_fast.reward.scorer import ImplicitRewardScorer

N, K, BETA = 8, 10, 5000.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_flops_per_s(device, dtype, size=2048, repeats=5) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def count_flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def record(benchmark, flops, device, dtype):
    achieved = flops / benchmark.stats.stats.median
    peak = matmul_flops_per_s(device, dtype)
    benchmark.extra_info.update(
        model_flops=flops, achieved_flops_per_s=achieved, matmul_flops_per_s=peak, mfu=achieved / peak
    )


@pytest.mark.parametrize("precision", ["naive-fp32", "fp32", "bf16"])
def test_mfu_reward_scorer(benchmark, arch, device, precision):
    """naive-fp32: the literal loop (per candidate, per draw, batch 1, eager) on the same models and draws."""
    from test_bench_reward import naive_score

    dtype = DTYPES[precision.removeprefix("naive-")]
    benchmark.group = "MFU: reward scorer N=8 x K=10"
    reference = build_unet(arch, device=device, dtype=dtype).eval()
    policy = copy.deepcopy(reference)
    side = UNET_CONFIGS[arch]["sample_size"]
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(N, 4, side, side, generator=gen).to(device)
    timesteps = torch.randint(0, 1000, (K,), generator=gen).to(device)
    noise = torch.randn(K, 4, side, side, generator=gen).to(device)
    embeds, added = random_conditioning(arch, 1, device=device, dtype=dtype)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scorer = ImplicitRewardScorer(policy, reference, scheduler, beta=BETA, num_draws=K, micro_batch=N * K)

    def run():
        if precision.startswith("naive"):
            out = naive_score(policy, reference, scheduler, latents, timesteps, noise, embeds, added)
        else:
            out = scorer.score(latents, embeds, added_cond_kwargs=added, timesteps=timesteps, noise=noise)
        sync(device)
        return out

    flops = count_flops(run)
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    record(benchmark, flops, device, dtype)


def test_mfu_dpo_train_step(benchmark, arch, device, tmp_path):
    """FLOPs of the step's math (policy forward and backward, reference forward) counted on the
    eager naive twin; time of the fast fp32 step (fused MSE, 8-bit AdamW, compiled)."""
    benchmark.group = "MFU: DPO train step, 4 pairs"
    flops = count_flops(NaiveStep(arch, device))
    step = make_step("fast-fp32", arch, device, str(tmp_path))

    def run():
        out = step()
        sync(device)
        return out

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    record(benchmark, flops, device, torch.float32)
