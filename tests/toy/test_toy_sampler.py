"""The samplers draw what they are prompted for: outcome tests on the shipped toy model.

Every other test compares code with a reference; these ask the question a user asks. A DDIM step
that clipped x0 but kept the unclipped eps once passed every equality test while drawing no
correct "1" at the toy config's 10 steps (and almost nothing right at 50).
"""

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler

from sail_fast.diffusion.sampling import SAMPLERS, step_options
from sail_fast.runs.config import load_config
from sail_fast.toy.human import ToyOracle
from sail_fast.toy.labels import oracle_samples
from sail_fast.toy.world import (
    DIGIT_WORDS,
    PLAIN_TEMPLATES,
    load_toy_stack,
    sample_digits,
)

TOY = load_config(Path(__file__).resolve().parents[2] / "configs" / "toy.yaml").sail
# Every plain prompt: 3 templates x (digit, word) per digit.
PROMPTS = [t.format(d=form) for d in range(10) for form in (str(d), DIGIT_WORDS[d]) for t in PLAIN_TEMPLATES]


@pytest.fixture(scope="module")
def accuracy():
    stack, oracle = load_toy_stack(), ToyOracle.load()
    cache = {}

    def of(sampler: str, steps: int, per_prompt: int) -> torch.Tensor:
        """Per-digit accuracy [10] at the config's guidance scale."""
        if (sampler, steps) not in cache:
            images = sample_digits(
                stack,
                PROMPTS,
                per_prompt,
                seed=3,
                batch_size=64,  # 128 rows per UNet call with CFG: the fastest per sample on one CPU thread
                progress=False,
                sampling={"sampler": sampler, "num_inference_steps": steps, "guidance_scale": TOY.guidance_scale},
            )
            correct = oracle_samples(oracle, images, PROMPTS)["correct"]
            cache[sampler, steps] = correct.view(10, -1).mean(1)
        return cache[sampler, steps]

    return of


@pytest.mark.slow
def test_every_sampler_at_the_config_steps_matches_ddpm_50(accuracy):
    reference = accuracy("ddpm", 50, 3).mean()
    assert reference > 0.9
    for sampler in SAMPLERS:
        got = accuracy(sampler, TOY.sampling_steps, 5).mean()
        assert abs(got - reference) < 0.05, (
            f"{sampler} at {TOY.sampling_steps} steps: accuracy {got:.3f}, DDPM 50: {reference:.3f}"
        )


@pytest.mark.slow
def test_base_draws_every_digit_at_the_config_sampler(accuracy):
    per_digit = accuracy(TOY.sampler, TOY.sampling_steps, 5)
    assert per_digit.min() >= 0.9, f"per-digit accuracy {per_digit.tolist()}"


def test_ddim_step_with_clipping_is_a_literal_ddim_step():
    """x0 is clipped and eps re-derived from it, so x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps
    describes one image; the default diffusers call (unclipped eps) does not."""
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=True)
    scheduler.set_timesteps(10)
    t, t_prev = scheduler.timesteps[1], scheduler.timesteps[2]
    gen = torch.Generator().manual_seed(0)
    x, eps = torch.randn(4, 1, 8, 8, generator=gen), torch.randn(4, 1, 8, 8, generator=gen)
    a, a_prev = scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[t_prev]
    x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
    assert (x0.abs() == 1).float().mean() > 0.3  # the clip is active, as it is early in a cosine schedule
    eps_clipped = (x - a.sqrt() * x0) / (1 - a).sqrt()
    want = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps_clipped
    got = scheduler.step(eps, t, x, **step_options(scheduler)).prev_sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    inconsistent = scheduler.step(eps, t, x).prev_sample
    assert (inconsistent - want).abs().max() > 0.1
    assert step_options(DDIMScheduler(clip_sample=False)) == {}
