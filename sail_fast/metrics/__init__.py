"""Image-quality and preference metrics from local weights: ``load_metric(name, weights_path)``.

Every metric scores PIL images given the prompt each was made for and returns one float per
image (higher is better); ``describe()`` names the model version beside every result.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from .base import Metric, MissingWeightsError

# name -> (module (in this package unless a full name), class, what the weights path must hold)
METRICS = {
    "pickscore": (
        "clip_metrics",
        "PickScore",
        "a transformers CLIP directory (PickScore_v1) with its processor files beside it or in processor/",
    ),
    "clipscore": ("clip_metrics", "ClipScore", "a transformers CLIP directory with its processor files"),
    "aesthetic": (
        "clip_metrics",
        "AestheticScore",
        "clip/ (CLIP ViT-L/14, transformers) and sac+logos+ava1-l14-linearMSE.pth",
    ),
    "hpsv2": ("hps", "HPSv2", "HPS_v2.1_compressed.pt or HPS_v2_compressed.pt, and tokenizer/ (CLIP BPE)"),
    "imagereward": ("image_reward", "ImageReward", "ImageReward.pt, med_config.json, tokenizer/vocab.txt"),
    "toy_oracle": (
        "sail_fast.toy.metrics",
        "ToyOracleScore",
        "nothing (the shipped toy model) or a `sail-fast toy pretrain` directory",
    ),
    "digit_accuracy": (
        "sail_fast.toy.metrics",
        "DigitAccuracy",
        "nothing (the shipped toy model) or a `sail-fast toy pretrain` directory",
    ),
    "toy_width": ("sail_fast.toy.metrics", "StrokeWidth", "nothing (a proxy that reads stroke width only)"),
}
# Metrics that need no path: they default to weights that ship with the package.
SHIPPED = {"toy_oracle", "digit_accuracy", "toy_width"}


def load_metric(name: str, weights: str | Path | None = None, **kw) -> Metric:
    """Build metric ``name`` from local ``weights`` (a directory or file; see METRICS for what it holds)."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
    module, cls, expected = METRICS[name]
    if weights is None and name not in SHIPPED:
        raise MissingWeightsError(
            f"{name}: no weights path given; pass --weights {name}=PATH where PATH holds {expected} "
            "(or --weights-dir ROOT with ROOT/" + name + ")"
        )
    # Registered by name and imported on first use: the toy world's metrics live with the toy world.
    module = module if module.startswith("sail_fast.") else f"{__name__}.{module}"
    return getattr(importlib.import_module(module), cls)(weights, **kw)


__all__ = ["METRICS", "Metric", "MissingWeightsError", "load_metric"]
