"""The round score against its definitions, and as a user meets it: the base model, asked which of a few
prompts a picture shows, picks the toy's samples' own prompt and rejects a wrong one."""

import copy
import math

import pytest
import torch
from digit_pairs import PROMPTS as DIGITS
from digit_pairs import bold_over_thin

from sail_fast.reward.scorer import ImplicitRewardScorer
from sail_fast.sail import round_score
from sail_fast.sail.round_score import OTHER_PROMPTS, heldout_fit, other_prompts, prompt_consistency
from sail_fast.toy.world import load_toy_stack, sample_digits

BETA = 5000.0
SAMPLING = {"sampler": "ddim", "num_inference_steps": 10, "guidance_scale": 7.5}


@pytest.fixture(scope="module")
def stack():
    return load_toy_stack()


def test_heldout_fit_is_the_dpo_loss_of_the_mean_reward_over_draws(stack, monkeypatch):
    """One factor 1/2, the mean over draws (not the sum), winner at index 0; hand-computed numbers."""
    reference = torch.full((2, 2, 2), 0.125)  # binary fractions: exact in fp32, so the numbers are exact too
    delta = torch.tensor(
        [
            [[-(2**-12), 0.0], [0.0, 0.0]],  # pair 1: the winner's error falls on one draw of two
            [[0.0, 0.0], [-(2**-11), 0.0]],  # pair 2: the loser's falls twice as far
        ]
    )
    monkeypatch.setattr(ImplicitRewardScorer, "pair_mse", lambda self, pairs, generator: (reference + delta, reference))
    policy, pairs = copy.deepcopy(stack.unet), bold_over_thin(stack, 1)
    fit = heldout_fit(policy, stack.unet, stack.scheduler, pairs, beta=BETA, seed=0, micro_batch=8)
    margins = (0.5 * BETA * 2**-13, -0.5 * BETA * 2**-12)  # r = -beta/2 * mean over draws of (policy - base)
    want = sum(math.log1p(math.exp(-m)) for m in margins) / 2  # -log sigmoid(m)
    assert fit["heldout_dpo_loss"] == pytest.approx(want, rel=1e-12)
    assert fit["heldout_accuracy"] == 0.5
    assert fit["heldout_margins"] == pytest.approx(margins, rel=1e-12)
    assert fit["heldout_drift"] == pytest.approx(delta.mean().item() / 0.125, rel=1e-12)


def test_heldout_fit_on_real_unets_pairs_its_draws_and_calls_a_tie_chance(stack, monkeypatch):
    monkeypatch.setattr(round_score, "HELDOUT_DRAWS", 4)  # what is tested holds at any count; fewer forwards
    pairs = bold_over_thin(stack, 1)
    policy = copy.deepcopy(stack.unet)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 2e-3)
    options = {"beta": BETA, "seed": 3, "micro_batch": 16}
    fit = heldout_fit(policy, stack.unet, stack.scheduler, pairs, **options)
    assert fit["heldout_pairs"] == 10 and fit["heldout_drift"] != 0.0

    # The same pairs with every label turned round. The draws are fixed by the seed and shared by a pair's two
    # images, so each margin only changes sign: the accuracy turns round and the drift (both images) is unchanged.
    swapped = copy.copy(pairs)
    swapped.win, swapped.lose = pairs.lose, pairs.win
    turned = heldout_fit(policy, stack.unet, stack.scheduler, swapped, **options)
    assert turned["heldout_accuracy"] == pytest.approx(1.0 - fit["heldout_accuracy"])
    assert turned["heldout_drift"] == pytest.approx(fit["heldout_drift"], rel=1e-9)
    assert turned["heldout_dpo_loss"] != pytest.approx(fit["heldout_dpo_loss"])
    assert turned["heldout_margins"] == pytest.approx([-m for m in fit["heldout_margins"]], rel=1e-9)

    # A policy with the base's weights is the base: every margin is 0, which is chance, not a miss.
    same = heldout_fit(copy.deepcopy(stack.unet), stack.unet, stack.scheduler, pairs, **options)
    assert same == heldout_fit(stack.unet, stack.unet, stack.scheduler, pairs, **options)
    assert (same["heldout_dpo_loss"], same["heldout_accuracy"], same["heldout_drift"]) == (math.log(2.0), 0.5, 0.0)
    assert same["heldout_margins"] == [0.0] * len(pairs)


def test_other_prompts_are_distinct_never_the_prompt_itself_and_fixed_by_the_seed():
    others = other_prompts(10, seed=0)
    assert others.shape == (10, OTHER_PROMPTS)
    assert all(len(set(row.tolist()) | {p}) == OTHER_PROMPTS + 1 for p, row in enumerate(others))
    assert torch.equal(others, other_prompts(10, seed=0)) and not torch.equal(others, other_prompts(10, seed=1))
    assert other_prompts(2, seed=0).tolist() == [[1], [0]]  # fewer prompts than OTHER_PROMPTS: every other one


def test_the_base_picks_a_samples_own_prompt_and_rejects_a_wrong_one(stack):
    n = 4
    samples = sample_digits(stack, DIGITS, n, seed=0, sampling=SAMPLING, progress=False)
    shown = prompt_consistency(stack, stack.unet, samples, DIGITS, seed=0, batch=64)
    # Each sample under a wrong prompt: the digit after the one it was drawn for.
    wrong = prompt_consistency(stack, stack.unet, samples, DIGITS[1:] + DIGITS[:1], seed=0, batch=64)
    assert shown["prompt_choice_accuracy"] > 0.8 and shown["prompt_consistency"] > 0.1  # chance is 1 / 4 and 0
    assert wrong["prompt_choice_accuracy"] < 0.25 and wrong["prompt_consistency"] < 0
    for score in (shown, wrong):
        for key in ("prompt_consistency_by_prompt", "prompt_choice_by_prompt"):
            assert len(score[key]) == len(DIGITS)
        # Every prompt has n samples, so the mean of the per-prompt shares is the overall share.
        assert sum(score["prompt_choice_by_prompt"]) / len(DIGITS) == pytest.approx(score["prompt_choice_accuracy"])
    assert prompt_consistency(stack, stack.unet, samples[:1], DIGITS[:1], seed=0, batch=64) == {}  # no other prompt
