"""How the implicit reward turns per-draw errors into one score per candidate.

Every estimator reads the same table: the policy's and the reference's MSE for each (prompt p,
candidate n, shared draw k), ``mse_policy`` and ``mse_ref`` [P, N, K]. With the per-draw gap
``g[p, n, k] = -beta/2 * (mse_policy - mse_ref)``:

- ``mean`` (the paper's, the default): ``r = mean_k g``. Low-t draws, whose gaps are 15-60 times
  wider across candidates than high-t ones on the toy, set it almost alone.
- ``standardised``: each draw's gaps standardised across the prompt's candidates,
  ``z = (g - mean_n g) / std_n g`` (unbiased std; 0 where a draw does not tell candidates apart),
  then ``r = mean_k z``: every draw counts the same, whatever its t.
- ``ref_normalised``: the gap as a share of the reference's error, ``r = mean_k (mse_ref - mse_policy) / mse_ref``:
  a candidate the reference finds easy (low error) does not win by a small absolute margin.
- ``rank``: each draw ranks the prompt's candidates by their gap (0 = lowest, ties share the mean
  rank), ``r = mean_k rank``: a per-draw vote that no single draw, however wide, can dominate.

The three debiased ones are scale-free (not in beta's units) and need every candidate of a prompt
scored on the same draws: the shared-draws convention the scorer keeps anyway.
"""

from __future__ import annotations

import torch

from ..kernels import implicit_reward

ESTIMATORS = ("mean", "standardised", "ref_normalised", "rank")


def per_draw_gap(mse_policy: torch.Tensor, mse_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """``-beta/2 * (mse_policy - mse_ref)``, one value per draw."""
    return -0.5 * beta * (mse_policy.double() - mse_ref.double())


def combine_draws(
    mse_policy: torch.Tensor, mse_ref: torch.Tensor, beta: float, estimator: str = "mean"
) -> torch.Tensor:
    """Rewards [P, N] from per-draw errors [P, N, K] by ``estimator`` (see the module docstring)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown reward estimator {estimator!r}; choose from {', '.join(ESTIMATORS)}")
    if mse_policy.shape != mse_ref.shape or mse_policy.dim() != 3:
        raise ValueError(
            f"mse_policy and mse_ref must both be [P, N, K], got {tuple(mse_policy.shape)} and {tuple(mse_ref.shape)}"
        )
    if estimator == "mean":
        return implicit_reward(mse_policy, mse_ref, beta)
    dtype = mse_policy.dtype
    if estimator == "ref_normalised":
        ref = mse_ref.double()
        return ((ref - mse_policy.double()) / ref.clamp_min(torch.finfo(torch.float64).tiny)).mean(-1).to(dtype)
    gap = per_draw_gap(mse_policy, mse_ref, beta)
    if estimator == "standardised":
        centred = gap - gap.mean(1, keepdim=True)
        std = gap.std(1, keepdim=True) if gap.shape[1] > 1 else torch.zeros_like(gap)
        z = torch.where(std > 0, centred / std.where(std > 0, 1.0), 0.0)
        return z.mean(-1).to(dtype)
    # rank: below[p, n, k] counts candidates m with a lower gap; ties count half.
    diff = gap.unsqueeze(2) - gap.unsqueeze(1)  # [P, N (n), N (m), K]: g_n - g_m
    ranks = (diff > 0).double().sum(2) + 0.5 * ((diff == 0).double().sum(2) - 1)
    return ranks.mean(-1).to(dtype)
