"""What marks a SAIL stage finished (``done.json``, written last), and reusing a finished iter0 stage
from another run (``sail.iter0_from``: ablations share one iter0)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..distributed import DistInfo
from ..rundir import read_json, write_json
from .evaluation import EVAL_SAMPLES

DONE = "done.json"


def reuse_iter0(source: Path, stage: Path, dist: DistInfo) -> None:
    """Record a finished iter0 stage elsewhere (``sail.iter0_from``) as this run's iter0: its evaluation is
    copied, its policy is read in place."""
    if not (source / DONE).exists():
        raise FileNotFoundError(f"sail.iter0_from={source} is not a finished iter0 stage (no {DONE})")
    if dist.is_main and not (stage / DONE).exists():
        stage.mkdir(parents=True, exist_ok=True)
        for name in ("eval.json", EVAL_SAMPLES):
            if (source / name).exists():
                shutil.copy(source / name, stage / name)
        write_json(stage / DONE, read_json(source / DONE) | {"from": str(source.resolve())})
    dist.barrier()
