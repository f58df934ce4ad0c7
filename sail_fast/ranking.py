"""Ranking a round's candidates by an external reward model (OnlineDPO), and SmPO soft labels.

SAIL ranks with its own implicit reward (``reward.ImplicitRewardScorer``). OnlineDPO, the
paper's Table 4 baseline, ranks the same candidates with an external scorer instead: any
``sail_fast.metrics`` metric, on the decoded pictures. Either way, SmPO-style smoothing turns
the two chosen candidates' scores into the probability that the winner is preferred.
"""

from __future__ import annotations

import torch

from .images import decode_latents
from .metrics import Metric
from .models import DiffusionStack


def external_scores(metric: Metric, stack: DiffusionStack, prompts: list[str], latents: torch.Tensor,
                    batch_size: int = 64) -> torch.Tensor:
    """``metric``'s score of every candidate: latents [P, N, C, H, W] -> scores [P, N] (float32, CPU)."""
    num_prompts, n = latents.shape[:2]
    flat = latents.flatten(0, 1)
    per_image = [p for p in prompts for _ in range(n)]
    scores = []
    for start in range(0, len(flat), batch_size):
        pictures = decode_latents(flat[start:start + batch_size], stack.vae)
        scores.append(metric.score(pictures, per_image[start:start + batch_size]))
    return torch.cat(scores).view(num_prompts, n)


def soft_labels(scores: torch.Tensor, win: torch.Tensor, lose: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """P(win preferred) per prompt: a two-way softmax over the pair's normalised scores.

    Scores [P, N] are normalised within each prompt, z = (s - mean) / std over its N candidates, so
    the label does not depend on the scorer's scale; then p = exp(z_w / T) / (exp(z_w / T) + exp(z_l / T))
    = sigmoid((z_w - z_l) / T). A prompt whose candidates all score the same gets p = 0.5. NaN scores
    (dropped candidates, ``drop_non_finite``) are left out of the mean and std.
    """
    scores = scores.double()
    finite = torch.isfinite(scores)
    count = finite.sum(dim=1, keepdim=True).clamp(min=1)
    mean = scores.nan_to_num(0.0).sum(dim=1, keepdim=True) / count
    var = ((scores - mean).nan_to_num(0.0) ** 2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)
    std = var.sqrt()
    z = (scores - mean) / torch.where(std > 0, std, torch.ones_like(std))
    rows = torch.arange(len(scores))
    return torch.sigmoid((z[rows, win] - z[rows, lose]) / temperature).float()


def drop_non_finite(scores: torch.Tensor, latents: torch.Tensor, win: torch.Tensor, lose: torch.Tensor,
                    best_worst: bool = True):
    """Keep non-finite candidates out of the pairs.

    A candidate is dropped when its score or any of its latent values is NaN or infinite (one NaN
    pixel would otherwise make it both the best and the worst of its prompt). Best/worst pairs are
    re-chosen among the finite candidates; random pairs that drew a dropped candidate are dropped.
    Returns (scores with NaN for the dropped, win, lose, keep [P] bool: prompts with a pair left,
    the number of dropped candidates)."""
    finite = torch.isfinite(scores) & torch.isfinite(latents.flatten(2).float()).all(-1).to(scores.device)
    dropped = int((~finite).sum())
    scores = scores.float().masked_fill(~finite, float("nan"))
    keep = finite.sum(1) >= 2
    if dropped == 0:
        return scores, win, lose, keep, 0
    if best_worst:
        win = scores.masked_fill(~finite, float("-inf")).argmax(1)
        lose = scores.masked_fill(~finite, float("inf")).argmin(1)
    else:
        rows = torch.arange(len(scores))
        keep &= finite[rows, win] & finite[rows, lose]
    return scores, win, lose, keep, dropped
