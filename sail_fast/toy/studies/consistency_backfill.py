"""Per-prompt prompt consistency for runs evaluated before ``eval.json`` recorded it (``sail-fast toy consistency``).

``select: paired`` tests a stage's consistency drop prompt by prompt against the base's. Runs evaluated before
``prompt_consistency_by_prompt`` was recorded have what it needs on disk: each stage's evaluation samples
(``eval_samples.safetensors``) and the base. This measures them again, the same way on the same draws, checks
that the recomputed mean reproduces the recorded ``prompt_consistency``, and writes the per-prompt values to
``<stage>/prompt_consistency.json``, a file of its own: the run's records are never rewritten.
"""

from __future__ import annotations

import math
from pathlib import Path

from safetensors.torch import load_file

from ...runs.layout import RunLayout
from ...runs.readback import read_json_file
from ...runs.run_folder import load_recorded_config, write_json
from ...sail.round_score import prompt_consistency
from ...sail.selection import BY_PROMPT, CONSISTENCY

FILE = "prompt_consistency.json"
# The recomputed mean must match the recorded one this closely: the same samples, draws and base give the same
# errors up to the order of float sums (the scoring batch).
MATCH = 1e-6


def backfilled_path(layout: RunLayout, stage: str) -> Path:
    return layout.stage(stage) / FILE


def with_backfill(layout: RunLayout, rows: list[dict]) -> list[dict]:
    """``rows`` (``metric_rows``), each lacking per-prompt consistency given the backfilled values where written."""
    merged = []
    for row in rows:
        path = backfilled_path(layout, row["stage"])
        if BY_PROMPT not in row and path.is_file():
            values = read_json_file(path, f"delete it and run `sail-fast toy consistency {layout.root}` again").get(
                BY_PROMPT
            )
            if not isinstance(values, list) or not all(isinstance(v, float) and math.isfinite(v) for v in values):
                raise ValueError(f"{path}: {BY_PROMPT} must be a list of finite numbers; delete the file and rerun")
            row = row | {BY_PROMPT: values}
        merged.append(row)
    return merged


def backfill_consistency(run: str | Path, log=print) -> list[str]:
    """Write ``<stage>/prompt_consistency.json`` for each stage of ``run`` evaluated without per-prompt values;
    returns the stages written. A stage with the values already (in eval.json or the file) is left alone."""
    from ...sail.loop import SailLoop

    layout = RunLayout(run)
    records = {stage: read_json_file(layout.eval_json(stage)) for stage in layout.evaluated_stages()}
    todo = [
        stage
        for stage, record in records.items()
        if BY_PROMPT not in record and not backfilled_path(layout, stage).exists()
    ]
    if not todo:
        return []
    missing = [stage for stage in todo if not layout.eval_samples(stage).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{run}: {', '.join(missing)} kept no evaluation samples (eval_samples.safetensors), so their per-prompt "
            "consistency cannot be measured again; evaluate those stages again instead"
        )
    # The run's own config and base; its code (toy.preference) is dropped: only the base and the prompts are used.
    loop = SailLoop(load_recorded_config(layout.root, [f"output_dir={layout.root}"], code="drop"), log=log)
    ctx = loop.ctx
    prompts = ctx.world.eval_prompts()
    for stage in todo:
        latents = load_file(layout.eval_samples(stage))["latents"]
        if latents.shape[0] != len(prompts):
            raise ValueError(
                f"{layout.eval_samples(stage)} holds {latents.shape[0]} prompts' samples, not {len(prompts)}"
            )
        values = prompt_consistency(ctx.stack, ctx.base, latents, prompts, seed=ctx.seed, batch=ctx.sail.scoring_batch)
        recorded = records[stage].get(CONSISTENCY)
        if not isinstance(recorded, float) or abs(values[CONSISTENCY] - recorded) > MATCH * max(1.0, abs(recorded)):
            raise ValueError(
                f"{layout.root}/{stage}: measured again, prompt consistency is {values[CONSISTENCY]:.6f} against the "
                f"recorded {recorded}: the samples, base or draws are not the ones evaluated, so nothing was written"
            )
        write_json(backfilled_path(layout, stage), {CONSISTENCY: values[CONSISTENCY], BY_PROMPT: values[BY_PROMPT]})
        log(f"{layout.root}/{stage}: per-prompt prompt consistency written ({len(prompts)} prompts)")
    return todo
