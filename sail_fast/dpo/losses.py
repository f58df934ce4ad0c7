"""The Diffusion-DPO family of losses, all computed from per-sample mean squared errors.

Rows come as one batch of 2B: the B winners first, then the B losers, each loser sharing
its winner's timestep and noise. ``paired_mse`` reads target, policy and reference
predictions in one pass; every loss below is then a small function of four [B] vectors.

| kind    | loss per pair                                                   | needs ref |
|---------|-----------------------------------------------------------------|-----------|
| sigmoid | -logsigmoid(u)                          (Diffusion-DPO)         | yes       |
| smpo    | -logsigmoid((2p - 1) * u), p = label     (smoothed soft labels) | yes       |
| hinge   | relu(1 - u)                                                     | yes       |
| ipo     | (u / beta - 1 / (2 beta))^2              (IPO on the same gap)  | yes       |
| sft     | mse_policy_win                           (supervised on winners)| no        |
| mapo    | mse_w - gamma * logsigmoid(log_odds)     (MaPO, margin-aware)   | no        |

with ``u = dpo_logit(...) = -beta/2 * ((mse_pol_w - mse_pol_l) - (mse_ref_w - mse_ref_l))``.
MaPO scores an image by ``s = -beta_mapo * mse`` read as a log-likelihood, so that
``log_odds = (s_w - s_l) - (log(1 - e^s_w) - log(1 - e^s_l))``; here ``beta_mapo`` is
``beta`` and ``gamma`` weighs the margin term against the winner's denoising loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels import dpo_logit, paired_mse

LOSSES = ("sigmoid", "smpo", "hinge", "ipo", "sft", "mapo")
REFERENCE_FREE = ("sft", "mapo")


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    metrics: dict[str, torch.Tensor]  # detached scalars: implicit_acc, mse_* means, logit mean


def loss_from_mse(
    kind: str,
    mse_policy_win: torch.Tensor,
    mse_policy_lose: torch.Tensor,
    mse_ref_win: torch.Tensor | None,
    mse_ref_lose: torch.Tensor | None,
    *,
    beta: float,
    labels: torch.Tensor | None = None,
    gamma: float = 0.1,
) -> LossOutput:
    """The loss of ``kind`` from per-pair MSEs ([B] each); see the module table."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
    if kind not in REFERENCE_FREE and (mse_ref_win is None or mse_ref_lose is None):
        raise ValueError(f"loss {kind!r} compares against a reference model; pass the reference MSEs")
    metrics = {"mse_policy_win": mse_policy_win.mean(), "mse_policy_lose": mse_policy_lose.mean()}
    if kind in REFERENCE_FREE:
        # Reference-free: accuracy is whether the policy denoises the winner better.
        implicit_acc = (mse_policy_win < mse_policy_lose).float().mean()
    else:
        u = dpo_logit(mse_policy_win, mse_policy_lose, mse_ref_win, mse_ref_lose, beta)
        implicit_acc = (u > 0).float().mean()
        metrics |= {"mse_ref_win": mse_ref_win.mean(), "mse_ref_lose": mse_ref_lose.mean(), "logit": u.mean()}
    if kind == "sigmoid":
        per_pair = -F.logsigmoid(u)
    elif kind == "smpo":
        p = torch.ones_like(u) if labels is None else labels.to(u)
        per_pair = -F.logsigmoid((2 * p - 1) * u)
    elif kind == "hinge":
        per_pair = F.relu(1 - u)
    elif kind == "ipo":
        per_pair = (u / beta - 1 / (2 * beta)) ** 2
    elif kind == "sft":
        per_pair = mse_policy_win
    else:  # mapo
        s_w, s_l = -beta * mse_policy_win, -beta * mse_policy_lose
        log_odds = (s_w - s_l) - (torch.log1p(-torch.exp(s_w)) - torch.log1p(-torch.exp(s_l)))
        per_pair = mse_policy_win - gamma * F.logsigmoid(log_odds)
    metrics["implicit_acc"] = implicit_acc
    loss = per_pair.mean()
    metrics["loss"] = loss
    return LossOutput(loss, {k: v.detach() for k, v in metrics.items()})


def preference_loss(
    kind: str,
    target: torch.Tensor,
    pred_policy: torch.Tensor,
    pred_ref: torch.Tensor | None,
    *,
    beta: float,
    labels: torch.Tensor | None = None,
    gamma: float = 0.1,
    fused: bool = True,
) -> LossOutput:
    """Loss for 2B rows (winners then losers) of target and predictions.

    ``fused=True`` reduces through ``paired_mse`` (the Triton kernel on CUDA); ``False``
    is the plain elementwise path, kept as the twin the fused one is tested against.
    """
    if target.shape[0] % 2:
        raise ValueError(f"expected 2B rows (winners then losers), got {target.shape[0]}")
    if pred_ref is None:
        if kind not in REFERENCE_FREE:
            raise ValueError(f"loss {kind!r} compares against a reference model; pass pred_ref")
        pred_ref = pred_policy.detach()  # read but unused: reference-free losses ignore it
    if fused:
        mse_policy, mse_ref = paired_mse(target, pred_policy, pred_ref.detach())
    else:
        target32 = target.float()
        mse_policy = F.mse_loss(pred_policy.float(), target32, reduction="none").flatten(1).mean(1)
        mse_ref = F.mse_loss(pred_ref.detach().float(), target32, reduction="none").flatten(1).mean(1)
    policy_win, policy_lose = mse_policy.chunk(2)
    ref_win, ref_lose = mse_ref.chunk(2)
    return loss_from_mse(kind, policy_win, policy_lose, ref_win, ref_lose, beta=beta, labels=labels, gamma=gamma)
