"""The implicit reward and the DPO logit against the formulas written out by hand."""

import pytest
import torch
from sail_fast.kernels import dpo_logit, implicit_reward, paired_mse_reference


def test_implicit_reward_formula():
    # Dyadic values, so the gaps below are exact in fp32.
    mse_policy = torch.tensor([[0.125, 0.25, 0.375], [0.5, 0.5, 0.5]])
    mse_ref = torch.tensor([[0.25, 0.25, 0.25], [0.375, 0.625, 0.5]])
    # Row 0: mean gap (-1/8 + 0 + 1/8)/3 = 0; row 1: (1/8 - 1/8 + 0)/3 = 0.
    torch.testing.assert_close(implicit_reward(mse_policy, mse_ref, beta=5000.0), torch.zeros(2))
    mse_policy = torch.tensor([[0.10, 0.12]])
    mse_ref = torch.tensor([[0.11, 0.13]])
    # -5000/2 * mean(-0.01, -0.01) = +25: a policy that denoises better is rewarded.
    torch.testing.assert_close(implicit_reward(mse_policy, mse_ref, beta=5000.0), torch.tensor([25.0]))


def test_reward_zero_when_policy_is_reference_and_flips_when_swapped():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(8, 10, generator=gen), torch.rand(8, 10, generator=gen)
    assert torch.equal(implicit_reward(a, a, beta=5000.0), torch.zeros(8))
    torch.testing.assert_close(implicit_reward(a, b, beta=7.0), -implicit_reward(b, a, beta=7.0))


def test_dpo_logit_formula_and_consistency_with_reward():
    pw, pl, rw, rl = torch.tensor([0.1]), torch.tensor([0.3]), torch.tensor([0.2]), torch.tensor([0.25])
    # -beta/2 * ((0.1 - 0.3) - (0.2 - 0.25)) = -1000 * (-0.15) = 150
    torch.testing.assert_close(dpo_logit(pw, pl, rw, rl, beta=2000.0), torch.tensor([150.0]))
    # With a single draw, the logit is the winner's reward minus the loser's.
    r_w = implicit_reward(pw[:, None], rw[:, None], beta=2000.0)
    r_l = implicit_reward(pl[:, None], rl[:, None], beta=2000.0)
    torch.testing.assert_close(dpo_logit(pw, pl, rw, rl, beta=2000.0), r_w - r_l)


def test_reward_uses_the_mean_squared_error_of_latents():
    # A prediction off by 0.01 everywhere on SD1.5-sized latents: the mean MSE is 1e-4, so
    # beta=5000 gives a reward of -0.25 per unit gap (a sum would give 16384x that).
    target = torch.zeros(1, 4, 64, 64)
    mse_policy, mse_ref = paired_mse_reference(target, target + 0.01, target)
    reward = implicit_reward(mse_policy[:, None], mse_ref[:, None], beta=5000.0)
    torch.testing.assert_close(reward, torch.tensor([-0.25]), rtol=1e-4, atol=0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="beta must be a positive number"):
        implicit_reward(torch.zeros(2), torch.zeros(2), beta=0.0)
    with pytest.raises(ValueError, match="same shape"):
        implicit_reward(torch.zeros(2, 3), torch.zeros(2, 4), beta=1.0)
    with pytest.raises(ValueError, match="share one shape"):
        dpo_logit(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2), beta=1.0)
