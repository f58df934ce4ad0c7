"""Paired, prompt-clustered statistics for model comparisons.

Every model is evaluated on the same prompts with the same noise seeds, so per-sample scores of
two models line up as [P prompts, n seeds] tables. Samples of one prompt are correlated, so the
prompt, not the sample, is the independent unit: standard errors come from the spread of
per-prompt means (a cluster-robust standard error with equal cluster sizes).
"""

from __future__ import annotations

import math

import torch


def clustered_mean(values: torch.Tensor) -> tuple[float, float]:
    """(mean, prompt-clustered standard error) of per-sample values [P, n]."""
    if values.dim() != 2 or values.shape[0] < 2:
        raise ValueError(f"need per-sample values as [prompts >= 2, samples], got shape {tuple(values.shape)}")
    per_prompt = values.double().mean(dim=1)
    return float(per_prompt.mean()), float(per_prompt.std() / math.sqrt(len(per_prompt)))


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(mean of a - b, its prompt-clustered standard error) for [P, n] scores of two models drawn with
    the same prompts and seeds."""
    if a.shape != b.shape:
        raise ValueError(
            f"paired scores must have the same [prompts, samples] shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return clustered_mean(a.double() - b.double())
