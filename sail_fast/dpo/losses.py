"""The Diffusion-DPO family of losses, all computed from per-sample mean squared errors.

Rows come as one batch of 2B: the B winners first, then the B losers, each loser sharing
its winner's timestep and noise. ``paired_mse`` reads target, policy and reference
predictions in one pass; every loss below is then a small function of four [B] vectors
(DSPO also reads the winner's predictions).

| kind    | loss per pair                                                     | source                         |
|---------|-------------------------------------------------------------------|--------------------------------|
| sigmoid | -logsigmoid(u)                                                    | Diffusion-DPO                  |
| smpo    | -logsigmoid(smpo_scale * (2p - 1) * u), p = label                 | SmPO-Diffusion (scale 10)      |
| hinge   | relu(1 - u)                                                       | SLiC-style hinge               |
| ipo     | (u / beta - 1 / (2 beta))^2                                       | IPO on the same gap            |
| dmpo    | KL(Bern(sigmoid(u)) || Bern(1 - dmpo_alpha))                      | DMPO, as Diffusion-SDPO runs it |
| dspo    | mean_dims[(eps_pol_w - eps_w) - beta (1 - sigmoid(u)) (eps_pol_w - eps_ref_w)]^2 | DSPO, SD1.5 form (SDXL: below) |
| dro     | relu((mse_pol_w - mse_ref_w) - (mse_pol_l - mse_ref_l) + margin)  | Diffusion-DRO (RealAlign stage 1) |
| sft     | mse_policy_win                                                    | supervised on winners          |
| mapo    | mse_w - gamma * logsigmoid(log_odds)                              | MaPO, margin-aware (ref-free)  |

with ``u = dpo_logit(...) = -beta/2 * ((mse_pol_w - mse_pol_l) - (mse_ref_w - mse_ref_l))``.
MaPO scores an image by ``s = -beta_mapo * mse`` read as a log-likelihood, so that
``log_odds = (s_w - s_l) - (log(1 - e^s_w) - log(1 - e^s_l))``; here ``beta_mapo`` is
``beta`` and ``gamma`` weighs the margin term against the winner's denoising loss.

DSPO's SDXL form, as Diffusion-SDPO's ``train.py`` runs it for SDXL: with d = eps_pol_w - eps_ref_w,
``mean[((1 - sigmoid(u)) d)^2]`` while the batch's mean d^2 is at least 0.1, else ``mean[(1 - sigmoid(u))^2]``.

SDPO's winner-preserving option (``winner_preserving_mu``, any loss with a reference) scales the
gradient that reaches the loser's MSE by lambda = clamp((1 - mu) <g_w, g_w> / <g_l, g_w>, 0, 1)
(1 when <g_l, g_w> <= 0), g the gradients of the winners' and losers' batch-mean MSE with respect to
the predictions: one lambda per micro-batch, which leaves every value unchanged and keeps a step from
raising the winner's loss (Diffusion-SDPO, AIDC-AI/Diffusion-SDPO ``train.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels import dpo_logit, paired_mse

LOSSES = ("sigmoid", "smpo", "hinge", "ipo", "dmpo", "dspo", "dro", "sft", "mapo")
REFERENCE_FREE = ("sft", "mapo")
NEEDS_PREDICTIONS = ("dspo",)  # not a function of the four MSE vectors alone


@dataclass(frozen=True)
class LossOptions:
    """The constants some losses read (see the module table); the trainer fills them from ``train.*``."""

    gamma: float = 0.1  # MaPO's margin weight
    smpo_scale: float = 10.0  # SmPO-Diffusion's factor beside beta
    dmpo_alpha: float = 0.01  # DMPO's target Bernoulli is 1 - alpha
    dro_margin: float = 0.001  # Diffusion-DRO's hinge margin


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
    options: LossOptions = LossOptions(),
) -> LossOutput:
    """The loss of ``kind`` from per-pair MSEs ([B] each); see the module table."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
    if kind in NEEDS_PREDICTIONS:
        raise ValueError(f"loss {kind!r} reads the predictions, not only their MSEs; call preference_loss")
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
        per_pair = -F.logsigmoid(options.smpo_scale * (2 * p - 1) * u)
    elif kind == "dmpo":
        # KL(Bern(p) || Bern(q)) with p = sigmoid(u), written with softplus for stable logs
        q = torch.tensor(1.0 - options.dmpo_alpha, dtype=u.dtype).clamp(1e-6, 1 - 1e-6)
        p, log_p, log_not_p = torch.sigmoid(u), -F.softplus(-u), -F.softplus(u)
        per_pair = p * (log_p - q.log()) + (1 - p) * (log_not_p - torch.log1p(-q))
    elif kind == "dro":
        per_pair = F.relu((mse_policy_win - mse_ref_win) - (mse_policy_lose - mse_ref_lose) + options.dro_margin)
    elif kind == "hinge":
        per_pair = F.relu(1 - u)
    elif kind == "ipo":
        per_pair = (u / beta - 1 / (2 * beta)) ** 2
    elif kind == "sft":
        per_pair = mse_policy_win
    else:  # mapo
        s_w, s_l = -beta * mse_policy_win, -beta * mse_policy_lose
        log_odds = (s_w - s_l) - (torch.log1p(-torch.exp(s_w)) - torch.log1p(-torch.exp(s_l)))
        per_pair = mse_policy_win - options.gamma * F.logsigmoid(log_odds)
    metrics["implicit_acc"] = implicit_acc
    loss = per_pair.mean()
    metrics["loss"] = loss
    return LossOutput(loss, {k: v.detach() for k, v in metrics.items()})


def loser_gradient_scale(target: torch.Tensor, pred_policy: torch.Tensor, mu: float) -> torch.Tensor:
    """SDPO's lambda for 2B rows (winners then losers): see the module docstring. A detached scalar."""
    residual = (pred_policy.detach().float() - target.float()).chunk(2)
    n = residual[0].numel()
    grad_win, grad_lose = 2 * residual[0] / n, 2 * residual[1] / n  # d mean(r^2) / d pred
    num, den = (grad_win * grad_win).sum(), (grad_lose * grad_win).sum()
    if den <= 0:
        return torch.ones((), device=target.device)
    return ((1 - mu) * num / (den + 1e-9)).clamp(0.0, 1.0)


def preference_loss(
    kind: str,
    target: torch.Tensor,
    pred_policy: torch.Tensor,
    pred_ref: torch.Tensor | None,
    *,
    beta: float,
    labels: torch.Tensor | None = None,
    options: LossOptions = LossOptions(),
    winner_preserving_mu: float | None = None,
    dspo_sdxl: bool = False,
) -> LossOutput:
    """Loss for 2B rows (winners then losers) of target and predictions, reduced through ``paired_mse``
    (the Triton kernel on CUDA; its plain-torch twin is ``kernels/reference.py``)."""
    if target.shape[0] % 2:
        raise ValueError(f"expected 2B rows (winners then losers), got {target.shape[0]}")
    if pred_ref is None:
        if kind not in REFERENCE_FREE:
            raise ValueError(f"loss {kind!r} compares against a reference model; pass pred_ref")
        if winner_preserving_mu is not None:
            raise ValueError(f"winner-preserving scaling acts on the DPO logit; loss {kind!r} has none")
        pred_ref = pred_policy.detach()  # read but unused: reference-free losses ignore it
    mse_policy, mse_ref = paired_mse(target, pred_policy, pred_ref.detach())
    policy_win, policy_lose = mse_policy.chunk(2)
    ref_win, ref_lose = mse_ref.chunk(2)
    scale = None
    if winner_preserving_mu is not None:
        scale = loser_gradient_scale(target, pred_policy, winner_preserving_mu)
        policy_lose = policy_lose.detach() + scale * (policy_lose - policy_lose.detach())  # same value, scaled gradient
    common = {"beta": beta, "labels": labels, "options": options}
    if kind == "dspo":
        out = loss_from_mse("sigmoid", policy_win, policy_lose, ref_win, ref_lose, **common)
        u = dpo_logit(policy_win, policy_lose, ref_win, ref_lose, beta)
        b = target.shape[0] // 2
        weight = (1 - torch.sigmoid(u)).view(-1, *[1] * (target.dim() - 1))
        pred_win = pred_policy[:b].float()
        gap = pred_win - pred_ref[:b].detach().float()
        if not dspo_sdxl:
            loss = ((pred_win - target[:b].float()) - beta * weight * gap).pow(2).flatten(1).mean(1).mean()
        elif gap.pow(2).flatten(1).mean(1).mean() >= 0.1:
            loss = (weight * gap).pow(2).flatten(1).mean(1).mean()
        else:
            loss = (1 - torch.sigmoid(u)).pow(2).mean()
        out = LossOutput(loss, out.metrics | {"loss": loss.detach()})
    else:
        out = loss_from_mse(kind, policy_win, policy_lose, ref_win, ref_lose, **common)
    if scale is not None:
        out.metrics["loser_grad_scale"] = scale.detach()
    return out
