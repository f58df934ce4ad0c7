"""The toy world's hidden oracle and its digit classifier, as metrics of the same interface."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..metrics.base import Metric


def pictures_to_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """Greyscale PIL images to the toy world's [B, 1, H, W] pixels in [-1, 1]."""
    arrays = np.stack([np.asarray(im.convert("L"), dtype=np.float32) for im in images])
    return torch.from_numpy(arrays).unsqueeze(1) / 127.5 - 1


class _ToyMetric(Metric):
    batch_size = 256

    def __init__(self, root: str | Path | None = None, preference=None, **_) -> None:
        from ..diffusion.stack import TOY_MODEL_DIR
        from .human import ToyOracle

        self.weights = str(root or TOY_MODEL_DIR)
        self.oracle = ToyOracle.load(root, preference=preference)

    def _components(self, images, prompts) -> tuple[dict, torch.Tensor]:
        from .world import digit_of

        digits = torch.tensor([digit_of(p) for p in prompts])
        return self.oracle.components(pictures_to_pixels(images), digits), digits


class ToyOracleScore(_ToyMetric):
    name = "toy_oracle"
    version = (
        "toy human: log p_clf(digit) (floored at -10) - ((width - w*) / s)^2 - haze / h0 - 4 offset, "
        "or toy.preference when given"
    )

    def _score_batch(self, images, prompts):
        return self._components(images, prompts)[0]["score"]


class DigitAccuracy(_ToyMetric):
    name, version = "digit_accuracy", "toy classifier: 1 if the prompted digit is the most likely one, else 0"

    def _score_batch(self, images, prompts):
        parts, digits = self._components(images, prompts)
        return (parts["predicted"] == digits).float()


class StrokeWidth(_ToyMetric):
    """A one-aspect proxy reward model, as a single aesthetic scorer is for real images: it sees only
    stroke width and always prefers bolder, where the human's width term stops paying at w*."""

    name, version = "toy_width", "toy proxy: share of stroke pixels (intensity > 0.5), monotone"

    def _score_batch(self, images, prompts):
        from .human import stroke_width

        return stroke_width((pictures_to_pixels(images)[:, 0] + 1) / 2)
