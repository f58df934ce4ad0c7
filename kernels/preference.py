"""The implicit DPO reward and the Diffusion-DPO logit, each defined once.

Both come from per-sample *mean* squared errors (see ``paired_mse``); beta is tuned to
the mean, so a sum here would make beta C*H*W times too strong.
"""

from __future__ import annotations

import torch


def _scaled_gap(mse_gap: torch.Tensor, beta: float) -> torch.Tensor:
    # The one place where the factor 1/2 of -beta/2 is applied.
    if not beta > 0:
        raise ValueError(f"beta must be a positive number, got {beta!r}")
    return -0.5 * beta * mse_gap


def implicit_reward(mse_policy: torch.Tensor, mse_ref: torch.Tensor, beta: float, *, dim: int = -1) -> torch.Tensor:
    """``r = -beta/2 * mean_over_draws(mse_policy - mse_ref)``.

    ``mse_policy`` and ``mse_ref`` hold one value per draw; ``dim`` is the draw axis,
    which is reduced away. A candidate the policy denoises better than the reference
    gets a positive reward; at initialisation (policy == reference) it is exactly 0.
    """
    if mse_policy.shape != mse_ref.shape:
        raise ValueError(
            f"mse_policy {tuple(mse_policy.shape)} and mse_ref {tuple(mse_ref.shape)} must have the same shape"
        )
    return _scaled_gap((mse_policy - mse_ref).mean(dim=dim), beta)


def dpo_logit(
    mse_policy_win: torch.Tensor,
    mse_policy_lose: torch.Tensor,
    mse_ref_win: torch.Tensor,
    mse_ref_lose: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Diffusion-DPO logit ``u = -beta/2 * ((mse_pol_w - mse_pol_l) - (mse_ref_w - mse_ref_l))``.

    Winner and loser must share the same timestep and noise; the loss is ``-logsigmoid(u)``.
    """
    shapes = {tuple(t.shape) for t in (mse_policy_win, mse_policy_lose, mse_ref_win, mse_ref_lose)}
    if len(shapes) != 1:
        raise ValueError(f"the four per-pair MSE tensors must share one shape, got {sorted(shapes)}")
    return _scaled_gap((mse_policy_win - mse_policy_lose) - (mse_ref_win - mse_ref_lose), beta)
