"""Where a SAIL run's prompts, human pairs, real images and judgments come from.

The plain ``World`` reads what the config names: ``sail.prompts``, ``data.seed_pairs``,
``sail.heldout_pairs`` and ``sail.real.data``; it has no judge of its own. A world with a hidden
human (the toy world, ``sail_fast.toy.run``) labels its own pairs, writes its own real images and
judges every stage's samples. Worlds are looked up by name in ``WORLDS`` and imported only when a
run asks for one, so nothing here depends on them.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from ..diffusion.prompts import read_prompts
from ..runs.config import SailConfig, ToyConfig

WORLDS = {"toy": "sail_fast.toy.run:ToyWorld"}  # name -> "module:class"


class World:
    """``sail``: the run's sail section; ``seed_pairs``: ``data.seed_pairs``; ``seed``: the run's seed;
    ``toy``: the toy world's own section (read by the toy world only)."""

    def __init__(
        self, sail: SailConfig, seed_pairs: list[str], *, seed: int, out: Path, log=print, toy: ToyConfig | None = None
    ) -> None:
        self.sail, self.seed_pairs, self.seed, self.toy, self.out, self.log = (
            sail,
            list(seed_pairs),
            seed,
            toy,
            Path(out),
            log,
        )

    def round_pool(self) -> list[str]:
        """Prompts the rounds draw from, in order (disjoint slices per round)."""
        if self.sail.prompts is None:
            raise ValueError("sail.prompts is not set: point it at a prompt file (.txt, .tsv, .json or .parquet)")
        return list(dict.fromkeys(read_prompts(self.sail.prompts)))  # unique, file order

    def eval_prompts(self) -> list[str]:
        """Each stage's evaluation prompts: the first of the pool that no round uses."""
        sail = self.sail
        pool = self.round_pool()
        return (pool[sail.prompts_per_round * sail.rounds :] or pool)[: sail.eval_prompts]

    def human_pairs(self, ctx) -> tuple[list[str], list[str]]:
        """(seed pair sources, held-out pair sources)."""
        return list(self.seed_pairs), list(self.sail.heldout_pairs)

    def real_images(self, ctx, need: int) -> Path:
        """A folder or parquet of real images with captions, for RealAlign's pairs."""
        return Path(self.sail.real.data)

    # The world's own subject masks for RealAlign's inpaint loser (pixels [B, C, H, W] in [-1, 1] ->
    # [B, 1, H, W] in [0, 1]); None: the config must name them (sail.real.mask).
    subject_masks = None

    def metric_options(self, name: str) -> dict:
        """Extra keyword arguments for loading ranker metric ``name``."""
        return {}

    def judge(self, latents: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor] | None:
        """Per-sample scores {term: [P, n]} of evaluation latents [P, n, ...]; None: no judge."""
        return None

    # Judged terms (keys of ``judge``'s tables) whose correlation with the reward each stage reports.
    reward_correlates: tuple[str, ...] = ()

    def summary(self, samples: dict[str, torch.Tensor], prompts: list[str]) -> dict:
        """A stage's metrics from its judged samples."""
        return {}

    def report(self, ctx, rows: list[dict], last: str) -> str:
        """Anything to show at the end of a run (a comparison picture); returns text for summary.md."""
        return ""


def world_class(toy: bool) -> type[World]:
    """The world a run lives in: the toy world for ``model.toy``, else the plain one."""
    if not toy:
        return World
    module, _, name = WORLDS["toy"].partition(":")
    return getattr(importlib.import_module(module), name)
