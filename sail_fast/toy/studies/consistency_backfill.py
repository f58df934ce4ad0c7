"""The per-prompt round score for runs evaluated before ``eval.json`` recorded it (``sail-fast toy consistency``).

``select: paired`` and ``select: tested`` test a stage's drop in prompt consistency or prompt choice prompt by
prompt against the base's, and ``tested`` reads how many held-out pairs the accuracy was measured on. Runs
evaluated before those were recorded have what they need on disk: each stage's evaluation samples
(``eval_samples.safetensors``), the base and the held-out pairs. This measures the per-prompt values again, the
same way on the same draws, checks that they reproduce the recorded ``prompt_consistency`` and
``prompt_choice_accuracy``, and writes them to ``<stage>/round_score.json``, a file of its own: the run's records
are never rewritten. (``<stage>/prompt_consistency.json``, the per-prompt consistency alone, is what the first
version wrote; it is still read.)
"""

from __future__ import annotations

import math
from pathlib import Path

from safetensors.torch import load_file

from ...runs.layout import RunLayout
from ...runs.readback import read_json_file
from ...runs.run_folder import load_recorded_config, write_json
from ...sail.round_score import prompt_consistency
from ...sail.selection import ACCURACY, BY_PROMPT, CHOICE, CHOICE_BY_PROMPT, CONSISTENCY, HELDOUT_PAIRS

FILE = "round_score.json"
FIRST_FILE = "prompt_consistency.json"  # the first version's: per-prompt consistency only
# The recomputed means must match the recorded ones this closely: the same samples, draws and base give the same
# errors up to the order of float sums (the scoring batch).
MATCH = 1e-6
PER_PROMPT = (BY_PROMPT, CHOICE_BY_PROMPT)


def backfilled_path(layout: RunLayout, stage: str, name: str = FILE) -> Path:
    return layout.stage(stage) / name


def _finite_list(values) -> bool:
    return isinstance(values, list) and all(isinstance(v, float) and math.isfinite(v) for v in values)


def with_backfill(layout: RunLayout, rows: list[dict]) -> list[dict]:
    """``rows`` (``metric_rows``), each given the backfilled values it lacks, where they were written."""
    merged = []
    fix = f"delete it and run `sail-fast toy consistency {layout.root}` again"
    for row in rows:
        for name, keys in ((FILE, PER_PROMPT + (HELDOUT_PAIRS,)), (FIRST_FILE, (BY_PROMPT,))):
            path = backfilled_path(layout, row["stage"], name)
            if all(key in row for key in keys) or not path.is_file():
                continue
            record = read_json_file(path, fix)
            for key in keys:
                if key in row or key not in record:
                    continue
                value = record[key]
                ok = _finite_list(value) if key in PER_PROMPT else isinstance(value, int) and value > 0
                if not ok or isinstance(value, bool):
                    raise ValueError(f"{path}: {key} holds {value!r}, not what the evaluation records; {fix}")
                row = row | {key: value}
        merged.append(row)
    return merged


def heldout_pair_count(layout: RunLayout, data_dir: str | None) -> int | None:
    """How many held-out human pairs the toy run labelled (lines of ``heldout.jsonl``); None where there is none."""
    path = layout.human_pairs(data_dir).heldout
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as f:
        return sum(1 for line in f if line.strip()) or None


def backfill_consistency(run: str | Path, log=print) -> list[str]:
    """Write ``<stage>/round_score.json`` for each stage of ``run`` evaluated without per-prompt consistency and
    choice; returns the stages written. A stage whose eval.json has them, or that has the file, is left alone."""
    from ...sail.loop import SailLoop

    layout = RunLayout(run)
    records = {stage: read_json_file(layout.eval_json(stage)) for stage in layout.evaluated_stages()}
    todo = [
        stage
        for stage, record in records.items()
        if not all(key in record for key in PER_PROMPT) and not backfilled_path(layout, stage).exists()
    ]
    if not todo:
        return []
    missing = [stage for stage in todo if not layout.eval_samples(stage).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{run}: {', '.join(missing)} kept no evaluation samples (eval_samples.safetensors), so their per-prompt "
            "scores cannot be measured again; evaluate those stages again instead"
        )
    # The run's own config and base; its code (toy.preference) is dropped: only the base and the prompts are used.
    cfg = load_recorded_config(layout.root, [f"output_dir={layout.root}"], code="drop")
    loop = SailLoop(cfg, log=log)
    ctx = loop.ctx
    prompts = ctx.world.eval_prompts()
    pairs = heldout_pair_count(layout, cfg.toy.data_dir if cfg.toy else None)
    for stage in todo:
        latents = load_file(layout.eval_samples(stage))["latents"]
        if latents.shape[0] != len(prompts):
            raise ValueError(
                f"{layout.eval_samples(stage)} holds {latents.shape[0]} prompts' samples, not {len(prompts)}"
            )
        values = prompt_consistency(ctx.stack, ctx.base, latents, prompts, seed=ctx.seed, batch=ctx.sail.scoring_batch)
        for key in (CONSISTENCY, CHOICE):
            recorded = records[stage].get(key)
            if not isinstance(recorded, float) or abs(values[key] - recorded) > MATCH * max(1.0, abs(recorded)):
                raise ValueError(
                    f"{layout.root}/{stage}: measured again, {key} is {values[key]:.6f} against the recorded "
                    f"{recorded}: the samples, base or draws are not the ones evaluated, so nothing was written"
                )
        found = {key: values[key] for key in (CONSISTENCY, CHOICE) + PER_PROMPT}
        if pairs is not None and isinstance(records[stage].get(ACCURACY), float):
            found[HELDOUT_PAIRS] = pairs
        write_json(backfilled_path(layout, stage), found)
        log(f"{layout.root}/{stage}: per-prompt prompt consistency and choice written ({len(prompts)} prompts)")
    return todo
