"""What every metric shares: the interface, local-weights checks, batching, device choice."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import nn


class MissingWeightsError(FileNotFoundError):
    """A metric's weights are not where the user pointed; the message lists the files expected."""


def require_files(root: str | Path, metric: str, expected: dict[str, tuple[str, ...]]) -> dict[str, Path]:
    """Find each expected file under ``root``; ``expected`` maps a role to its accepted names (first found wins).

    Raises MissingWeightsError naming every missing role and the names accepted for it.
    """
    root = Path(root)
    if not root.is_dir():
        raise MissingWeightsError(
            f"{metric}: weights directory {str(root)!r} does not exist; it should hold "
            + "; ".join(" or ".join(names) for names in expected.values())
        )
    found, missing = {}, []
    for role, names in expected.items():
        hit = next((root / n for n in names if (root / n).exists()), None)
        if hit is None:
            missing.append(f"{role}: " + " or ".join(names))
        else:
            found[role] = hit
    if missing:
        present = sorted(p.name for p in root.iterdir())[:20]
        raise MissingWeightsError(f"{metric}: {root} is missing " + "; ".join(missing) + f" (found {present})")
    return found


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Metric:
    """A per-image score given the prompt it was made for; higher is better for every metric here.

    Subclasses set ``name`` and ``version`` (written beside every result, so a number always says
    which model produced it) and implement ``_score_batch``.
    """

    name: str = "metric"
    version: str = ""
    weights: str = ""
    batch_size: int = 16
    # (lo, hi) of the score in its own units for SmPO's min-max soft labels, where a published one exists.
    soft_label_range: tuple[float, float] | None = None

    def _score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """Float32 scores [len(images)] on the CPU; ``prompts[i]`` is the prompt of ``images[i]``."""
        if len(images) != len(prompts):
            raise ValueError(f"{self.name}: {len(images)} images but {len(prompts)} prompts; give one prompt per image")
        out = [
            self._score_batch(images[i : i + self.batch_size], prompts[i : i + self.batch_size]).float().cpu()
            for i in range(0, len(images), self.batch_size)
        ]
        return torch.cat(out) if out else torch.zeros(0)

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "weights": self.weights}


def mlp_head() -> nn.Sequential:
    """The linear head of the LAION aesthetic predictor and of ImageReward: 768-1024-128-64-16-1, dropouts
    between, no activations. Layer indices match both published state dicts (layers.0, .2, .4, .6, .7)."""
    return nn.Sequential(
        nn.Linear(768, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )


def load_head_state(path: Path, prefix: str = "layers.") -> dict[str, torch.Tensor]:
    """A head's state dict from .safetensors or a plain-tensor .pth/.pt, with ``prefix`` dropped from its keys."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return {k.removeprefix(prefix): v for k, v in state.items()}
