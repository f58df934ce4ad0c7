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
    = sigmoid((z_w - z_l) / T). A prompt whose candidates all score the same gets p = 0.5.
    """
    scores = scores.double()
    std = scores.std(dim=1, keepdim=True)
    z = (scores - scores.mean(dim=1, keepdim=True)) / torch.where(std > 0, std, torch.ones_like(std))
    rows = torch.arange(len(scores))
    return torch.sigmoid((z[rows, win] - z[rows, lose]) / temperature).float()
