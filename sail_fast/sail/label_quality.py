"""How good the self-labels are, where the world has a judge (the toy's noiseless human): a diagnostic
written beside the run's results. The method never reads it.

For each prompt's candidates, their rewards [P, N], the chosen (winner, loser) and the judge's
per-candidate terms (``World.judge``: ``score`` and others, [P, N] each):

- ``label_accuracy``: the share of chosen pairs whose winner the judge scores higher (ties: half);
- ``label_gap_share``: the mean judged gap of winner minus loser, as a share of the mean gap between the
  judge's own best and worst candidate of the same prompts (1: the judge's own choice; 0: chance);
- ``reward_human_spearman``: the within-prompt Spearman correlation of reward and judged score, averaged
  over prompts;
- ``reward_<term>_spearman``: the same against each of the world's ``reward_correlates`` (the toy's stroke
  width and the classifier's log p of the prompted digit): what else the reward tracks;
- ``best_wrong_digit`` / ``worst_wrong_digit``: how many winners / losers the judge reads as another
  digit, where it says (``correct``).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata

from ..runs.seeding import EVAL_LABEL_QUALITY_DRAWS, derive_seed


def rowwise_spearman(a, b) -> np.ndarray:
    """Spearman correlation of a[p] and b[p] per row ([P, N] each; ties share their mean rank); NaN where
    a row is constant or not finite."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra, rb = ra - ra.mean(1, keepdims=True), rb - rb.mean(1, keepdims=True)
    denom = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(1) / denom, np.nan)


def within_prompt_spearman(a, b) -> float:
    """Mean over rows of ``rowwise_spearman`` (rows where it is undefined left out; NaN if none is left)."""
    rho = rowwise_spearman(a, b)
    return float(np.nanmean(rho)) if np.isfinite(rho).any() else float("nan")


def label_quality(
    judged: dict[str, torch.Tensor],
    rewards: torch.Tensor,
    win: torch.Tensor,
    lose: torch.Tensor,
    correlates: tuple[str, ...] = (),
) -> dict:
    """The diagnostics above, for prompts whose rewards are all finite."""
    keep = torch.isfinite(rewards).all(1)
    if not keep.any():
        return {}
    rewards, win, lose = rewards[keep], win[keep], lose[keep]
    terms = {k: v[keep].double() for k, v in judged.items()}
    score, rows = terms["score"], torch.arange(len(rewards))
    gap = score[rows, win] - score[rows, lose]
    own_gap = (score.max(1).values - score.min(1).values).mean()
    out = {
        "label_accuracy": float(((gap > 0).double() + 0.5 * (gap == 0).double()).mean()),
        "label_gap_share": float(gap.mean() / own_gap) if own_gap > 0 else float("nan"),
        "reward_human_spearman": within_prompt_spearman(rewards, score),
    }
    out |= {
        f"reward_{term}_spearman": within_prompt_spearman(rewards, terms[term]) for term in correlates if term in terms
    }
    if "correct" in terms:
        out["best_wrong_digit"] = int((terms["correct"][rows, win] == 0).sum())
        out["worst_wrong_digit"] = int((terms["correct"][rows, lose] == 0).sum())
    return out


@torch.no_grad()
def eval_label_quality(ctx, scorer, latents: torch.Tensor, prompts: list[str], judged: dict[str, torch.Tensor]) -> dict:
    """``label_quality`` of a stage's policy on its own evaluation samples [P, n, ...]: the first
    ``sail.candidates`` samples of each prompt are ranked as a round would rank them (best against
    worst by the stage's scorer, K shared draws per prompt fixed by the run's seed)."""
    n = min(latents.shape[1], ctx.sail.candidates)
    if n < 2:
        return {}
    latents = latents[:, :n].to(ctx.device)
    embeds = ctx.stack.encode_prompts(prompts).to(ctx.device, scorer.dtype)
    added = ctx.stack.added_cond_kwargs(embeds, *latents.shape[-2:])
    rewards = (
        scorer.score_many(
            latents,
            embeds.prompt_embeds,
            added_cond_kwargs=added,
            generator=torch.Generator().manual_seed(derive_seed(ctx.seed, EVAL_LABEL_QUALITY_DRAWS)),
        )
        .float()
        .cpu()
    )
    judged = {k: v[:, :n] for k, v in judged.items()}
    return label_quality(judged, rewards, rewards.argmax(1), rewards.argmin(1), ctx.world.reward_correlates)
