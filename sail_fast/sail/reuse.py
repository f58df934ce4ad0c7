"""Reusing a finished iter0 stage from another run (``sail.iter0_from``: ablations share one iter0)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..runs.distributed import DistInfo
from ..runs.layout import DONE, EVAL_JSON, EVAL_SAMPLES, RunLayout
from ..runs.run_folder import read_json, write_json


def reuse_iter0(source: Path, layout: RunLayout, dist: DistInfo) -> None:
    """Record a finished iter0 stage folder elsewhere (``sail.iter0_from``) as this run's iter0: its evaluation
    is copied, its policy is read in place (``RunLayout.final(0)``)."""
    if not (source / DONE).exists():
        raise FileNotFoundError(f"sail.iter0_from={source} is not a finished iter0 stage (no {DONE})")
    stage = layout.stage(RunLayout.ITER0)
    if dist.is_main and not layout.done(RunLayout.ITER0).exists():
        stage.mkdir(parents=True, exist_ok=True)
        for name in (EVAL_JSON, EVAL_SAMPLES):
            if (source / name).exists():
                shutil.copy(source / name, stage / name)
        write_json(layout.done(RunLayout.ITER0), read_json(source / DONE) | {"from": str(source.resolve())})
    dist.barrier()
