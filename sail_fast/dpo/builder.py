"""The one place a run's config becomes a ``DPOTrainer``: its train section plus the few plain values the
trainer needs from the rest (the stage's seed, the data's caption dropout, the output folder)."""

from __future__ import annotations

from ..runs.config import RunConfig
from .trainer import DPOTrainer


def trainer_for(config: RunConfig, policy, scheduler, seed_pairs, **options) -> DPOTrainer:
    """A DPOTrainer with ``config``'s train section, seed and caption dropout, in ``config.output_dir`` unless
    ``options`` names another ``output_dir``; ``options``: DPOTrainer's other keywords (dist, device, ...)."""
    options.setdefault("output_dir", config.output_dir)
    return DPOTrainer(
        config.train,
        policy,
        scheduler,
        seed_pairs,
        seed=config.seed,
        caption_dropout=config.data.caption_dropout,
        **options,
    )
