"""Seeds derived from a run's seed and a position, so every random draw is reproducible
from the config alone and independent of batching, rank count or resumption."""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (well mixed, no collisions in practice)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


def generator(*parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(derive_seed(*parts))
