"""ImplicitRewardScorer against the reward formula written as a literal loop."""

import copy
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sail_fast.diffusion.tiny import tiny_stack
from sail_fast.reward.scorer import ImplicitRewardScorer

BETA, N, K = 5000.0, 8, 10


def _perturbed_copy(unet, scale=0.02, seed=0):
    twin = copy.deepcopy(unet)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return twin


@pytest.fixture(scope="module", params=["sd15", pytest.param("sdxl", marks=pytest.mark.slow)])  # sdxl: the slow tier
def setup(request):
    stack = tiny_stack(request.param, seed=0)
    reference = stack.unet.eval()
    policy = _perturbed_copy(reference).eval()
    embeds = stack.encode_prompts(["a cat", "a red dog"])
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2, N, 4, 16, 16, generator=gen)
    timesteps = torch.randint(0, 1000, (2, K), generator=gen)
    noise = torch.randn(2, K, 4, 16, 16, generator=gen)
    return stack, policy, reference, embeds, latents, timesteps, noise


def _scorer(setup, **kw):
    stack, policy, reference = setup[:3]
    return ImplicitRewardScorer(policy, reference, stack.scheduler, beta=BETA, num_draws=K, **kw)


def _added(stack, embeds, rows):
    added = stack.added_cond_kwargs(embeds, 16, 16)
    return None if added is None else {k: v[rows] for k, v in added.items()}


@torch.no_grad()
def _literal_reward(stack, policy, reference, x0, prompt_embeds, added, timesteps, noise):
    """The formula, one candidate and one draw at a time, batch 1, plain diffusers calls."""
    rewards = []
    for n in range(x0.shape[0]):
        gaps = []
        for k in range(timesteps.shape[0]):
            t = timesteps[k : k + 1]
            x_t = stack.scheduler.add_noise(x0[n : n + 1], noise[k : k + 1], t)
            kw = dict(encoder_hidden_states=prompt_embeds, added_cond_kwargs=added)
            mse_policy = F.mse_loss(policy(x_t, t, **kw).sample, noise[k : k + 1])
            mse_ref = F.mse_loss(reference(x_t, t, **kw).sample, noise[k : k + 1])
            gaps.append(mse_policy - mse_ref)
        rewards.append(-BETA / 2 * torch.stack(gaps).mean())
    return torch.stack(rewards)


def test_matches_literal_loop(setup):
    stack, policy, reference, embeds, latents, timesteps, noise = setup
    got = _scorer(setup, micro_batch=32).score(
        latents[0],
        embeds.prompt_embeds[:1],
        added_cond_kwargs=_added(stack, embeds, [0]),
        timesteps=timesteps[0],
        noise=noise[0],
    )
    expect = _literal_reward(
        stack,
        policy,
        reference,
        latents[0],
        embeds.prompt_embeds[:1],
        _added(stack, embeds, [0]),
        timesteps[0],
        noise[0],
    )
    assert got.shape == (N,) and got.dtype == torch.float32
    assert expect.abs().max() > 1.0  # the perturbed policy gives rewards far from 0
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-3)


def test_score_many_is_score_per_prompt(setup):
    stack, policy, reference, embeds, latents, timesteps, noise = setup
    scorer = _scorer(setup)
    many = scorer.score_many(
        latents, embeds.prompt_embeds, added_cond_kwargs=_added(stack, embeds, [0, 1]), timesteps=timesteps, noise=noise
    )
    for p in range(2):
        one = scorer.score(
            latents[p],
            embeds.prompt_embeds[p : p + 1],
            added_cond_kwargs=_added(stack, embeds, [p]),
            timesteps=timesteps[p],
            noise=noise[p],
        )
        torch.testing.assert_close(many[p], one, rtol=1e-5, atol=1e-3)


def test_per_candidate_embeddings_equal_shared_ones(setup):
    stack, _, _, embeds, latents, timesteps, noise = setup
    scorer = _scorer(setup)
    shared = scorer.score(
        latents[0],
        embeds.prompt_embeds[:1],
        added_cond_kwargs=_added(stack, embeds, [0]),
        timesteps=timesteps[0],
        noise=noise[0],
    )
    rows = [0] * N
    per_cand = scorer.score(
        latents[0],
        embeds.prompt_embeds[rows],
        added_cond_kwargs=_added(stack, embeds, rows),
        timesteps=timesteps[0],
        noise=noise[0],
    )
    torch.testing.assert_close(shared, per_cand, rtol=1e-5, atol=1e-3)


def test_zero_when_policy_is_reference_and_sign_flips_when_swapped(setup):
    stack, policy, reference, embeds, latents, timesteps, noise = setup
    kw = dict(added_cond_kwargs=_added(stack, embeds, [0]), timesteps=timesteps[0], noise=noise[0])
    same = ImplicitRewardScorer(reference, copy.deepcopy(reference), stack.scheduler, num_draws=K)
    assert torch.equal(same.score(latents[0], embeds.prompt_embeds[:1], **kw), torch.zeros(N))
    forward = _scorer(setup).score(latents[0], embeds.prompt_embeds[:1], **kw)
    swapped = ImplicitRewardScorer(reference, policy, stack.scheduler, beta=BETA, num_draws=K)
    torch.testing.assert_close(
        swapped.score(latents[0], embeds.prompt_embeds[:1], **kw), -forward, rtol=1e-6, atol=1e-4
    )


@pytest.mark.parametrize(
    "micro_batch", [pytest.param(3, marks=pytest.mark.slow), 7, pytest.param(160, marks=pytest.mark.slow)]
)
def test_invariant_to_micro_batch(setup, micro_batch):
    stack, _, _, embeds, latents, timesteps, noise = setup
    kw = dict(added_cond_kwargs=_added(stack, embeds, [0, 1]), timesteps=timesteps, noise=noise)
    base = _scorer(setup, micro_batch=64).score_many(latents, embeds.prompt_embeds, **kw)
    other = _scorer(setup, micro_batch=micro_batch).score_many(latents, embeds.prompt_embeds, **kw)
    torch.testing.assert_close(base, other, rtol=1e-5, atol=1e-3)


def test_generator_draws_are_reproducible(setup):
    stack, _, _, embeds, latents = setup[:5]
    scorer = _scorer(setup)
    kw = dict(added_cond_kwargs=_added(stack, embeds, [0]))
    a = scorer.score(latents[0], embeds.prompt_embeds[:1], generator=torch.Generator().manual_seed(5), **kw)
    b = scorer.score(latents[0], embeds.prompt_embeds[:1], generator=torch.Generator().manual_seed(5), **kw)
    c = scorer.score(latents[0], embeds.prompt_embeds[:1], generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.slow
def test_common_draws_reduce_variance_of_reward_differences(setup):
    # Measured, not assumed: over repeated scorings with fresh draws, the gap between two
    # candidates varies less when both see the same draws than when each has its own.
    stack, _, _, embeds, latents = setup[:5]
    scorer = ImplicitRewardScorer(setup[1], setup[2], stack.scheduler, beta=BETA, num_draws=2)
    emb, kw = embeds.prompt_embeds[:1], dict(added_cond_kwargs=_added(stack, embeds, [0]))
    shared, independent = [], []
    for rep in range(40):
        both = scorer.score(latents[0, :2], emb, generator=torch.Generator().manual_seed(rep), **kw)
        shared.append((both[0] - both[1]).item())
        r0 = scorer.score(latents[0, :1], emb, generator=torch.Generator().manual_seed(1000 + rep), **kw)
        r1 = scorer.score(latents[0, 1:2], emb, generator=torch.Generator().manual_seed(2000 + rep), **kw)
        independent.append((r0 - r1).item())
    assert statistics.variance(shared) < 0.75 * statistics.variance(independent)


def test_best_worst_is_the_argmax_and_argmin_of_the_rewards(setup):
    stack, _, _, embeds, latents, timesteps, noise = setup
    scorer = _scorer(setup)
    kw = dict(added_cond_kwargs=_added(stack, embeds, [0, 1]), timesteps=timesteps, noise=noise)
    rewards = scorer.score_many(latents, embeds.prompt_embeds, **kw)
    chosen = scorer.best_worst(latents, embeds.prompt_embeds, **kw)
    assert torch.equal(chosen.best, rewards.argmax(1)) and torch.equal(chosen.worst, rewards.argmin(1))
    assert chosen.unet_forwards == chosen.unet_forwards_full == 2 * 2 * N * K


def test_adaptive_without_elimination_is_the_full_search(setup):
    stack, _, _, embeds, latents, timesteps, noise = setup
    kw = dict(added_cond_kwargs=_added(stack, embeds, [0, 1]), timesteps=timesteps, noise=noise)
    scorer = _scorer(setup)
    full = scorer.best_worst(latents, embeds.prompt_embeds, **kw)
    never = scorer.best_worst(latents, embeds.prompt_embeds, adaptive=True, confidence_z=math.inf, **kw)
    assert torch.equal(full.best, never.best) and torch.equal(full.worst, never.worst)
    assert never.unet_forwards == full.unet_forwards_full
    torch.testing.assert_close(never.rewards, full.rewards, rtol=1e-5, atol=1e-3)


class ScaleNet(nn.Module):
    """A one-parameter denoiser, pred = w * x_t: rewards are then ordered by |x0| on every
    draw, so the race has a known right answer and clear margins."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(float(w)))

    def forward(self, x, t, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=True):
        return (self.w * x,)


def test_adaptive_race_finds_planted_best_and_worst_with_fewer_forwards():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    scorer = ImplicitRewardScorer(ScaleNet(0.9), ScaleNet(0.6), scheduler, beta=BETA, num_draws=K, channels_last=False)
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([1.0, 0.2, 1.1, 3.0, 0.9, 1.2, 1.0, 0.95])  # planted: worst 3, best 1 or the reverse
    latents = torch.randn(3, N, 4, 8, 8, generator=gen) * scales.view(1, N, 1, 1, 1)
    embeds = torch.zeros(3, 1, 4)
    full = scorer.best_worst(latents, embeds, generator=torch.Generator().manual_seed(1))
    fast = scorer.best_worst(latents, embeds, generator=torch.Generator().manual_seed(1), adaptive=True)
    assert set(full.best.tolist()) | set(full.worst.tolist()) == {1, 3}
    assert torch.equal(fast.best, full.best) and torch.equal(fast.worst, full.worst)
    assert fast.unet_forwards < 0.6 * full.unet_forwards_full


class TestBadCalls:
    def test_dtype_mismatch(self, setup):
        stack, policy, reference = setup[:3]
        with pytest.raises(ValueError, match="one dtype.*reward is not 0"):
            ImplicitRewardScorer(policy, copy.deepcopy(reference).to(torch.bfloat16), stack.scheduler)

    def test_noise_shape(self, setup):
        stack, _, _, embeds, latents, timesteps, noise = setup
        with pytest.raises(ValueError, match=r"noise must be \[P, K, C, H, W\]"):
            _scorer(setup).score(latents[0], embeds.prompt_embeds[:1], timesteps=timesteps[0], noise=noise[0, :, :2])

    def test_only_one_of_timesteps_and_noise(self, setup):
        stack, _, _, embeds, latents, timesteps, _ = setup
        with pytest.raises(ValueError, match="both timesteps and noise"):
            _scorer(setup).score(latents[0], embeds.prompt_embeds[:1], timesteps=timesteps[0])

    def test_embeds_batch(self, setup):
        stack, _, _, embeds, latents, timesteps, noise = setup
        with pytest.raises(ValueError, match="prompt_embeds has batch 3; expected 1 .* or 8"):
            _scorer(setup).score(latents[0], embeds.prompt_embeds[[0, 1, 0]], timesteps=timesteps[0], noise=noise[0])

    def test_timesteps_out_of_range(self, setup):
        stack, _, _, embeds, latents, timesteps, noise = setup
        with pytest.raises(ValueError, match=r"integers in \[0, 1000\)"):
            _scorer(setup).score(latents[0], embeds.prompt_embeds[:1], timesteps=timesteps[0] + 1000, noise=noise[0])


def test_scorer_leaves_its_callers_unets_as_they_were(setup):
    """The weights are channels_last only while a call scores: afterwards every parameter holds its own tensor again
    (same strides, same storage), and the rewards agree with a scorer that never converts."""
    stack, policy, reference, embeds, latents, timesteps, noise = setup
    policy, reference = copy.deepcopy(policy), copy.deepcopy(reference)
    layout = lambda: {
        (i, name): (p.stride(), p.data_ptr())
        for i, net in enumerate((policy, reference))  # noqa: E731
        for name, p in net.named_parameters()
    }
    before = layout()
    kw = dict(added_cond_kwargs=_added(stack, embeds, [0, 1]), timesteps=timesteps[:, :3], noise=noise[:, :3])
    fast = ImplicitRewardScorer(policy, reference, stack.scheduler, beta=BETA, num_draws=3, channels_last=True)
    rewards = fast.score_many(latents[:, :3], embeds.prompt_embeds, **kw)
    assert layout() == before
    assert all(p.is_contiguous() for net in (policy, reference) for p in net.parameters())
    plain = ImplicitRewardScorer(policy, reference, stack.scheduler, beta=BETA, num_draws=3, channels_last=False)
    torch.testing.assert_close(
        plain.score_many(latents[:, :3], embeds.prompt_embeds, **kw), rewards, rtol=1e-4, atol=5e-2
    )


def test_a_scoring_layout_block_converts_the_weights_once_for_all_its_calls(setup):
    """Inside scoring_layout() the 4-D weights stay channels_last across calls (each call finds them converted and
    leaves them, the same tensors); the rewards are those of calls made one by one; afterwards the caller's own
    tensors are back."""
    stack, policy, reference, embeds, latents, timesteps, noise = setup
    policy, reference = copy.deepcopy(policy), copy.deepcopy(reference)
    convs = [p for net in (policy, reference) for p in net.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert convs
    own = [p.data_ptr() for p in convs]
    kw = dict(added_cond_kwargs=_added(stack, embeds, [0, 1]), timesteps=timesteps[:, :3], noise=noise[:, :3])
    scorer = ImplicitRewardScorer(policy, reference, stack.scheduler, beta=BETA, num_draws=3, channels_last=True)
    one_by_one = [scorer.score_many(latents[:, :3], embeds.prompt_embeds, **kw) for _ in range(2)]
    with scorer.scoring_layout():
        held = [p.data_ptr() for p in convs]
        assert held != own and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
        in_block = [scorer.score_many(latents[:, :3], embeds.prompt_embeds, **kw) for _ in range(2)]
        assert [p.data_ptr() for p in convs] == held  # no call converted again, none put the old tensors back
    assert [p.data_ptr() for p in convs] == own
    for a, b in zip(one_by_one, in_block):
        assert torch.equal(a, b)
