"""Do a toy experiment's gains carry over to another sampler? (``sail-fast toy transfer``)

Every stage the experiment evaluated is sampled again on the same held-out prompts with the same
seeds, under another sampler (DDPM 50 steps by default; the loop ranks and evaluates with its own,
DDIM 10 in the toy configs), judged by the run's own human (``toy.preference`` included), and written
beside the stage's first evaluation in ``<run>/<sampler>-<steps>/<stage>/``. The table is the
experiment's, paired the same way: ``results-<sampler>-<steps>.md``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ...runs.layout import RunLayout
from ...runs.run_folder import load_recorded_config
from ...sail.evaluation import evaluate_stage
from ...sail.loop import SailLoop
from .experiment import base_evaluation, copy_finished, write_table


def evaluate_run_under(run: Path, variant: str, overrides: list[str], log=print, *, trust_code: bool = False) -> int:
    """Evaluate each evaluated stage of ``run`` again with ``overrides`` (sampler settings) into ``run/variant``;
    returns the run's round count. ``trust_code``: run the code the run's config names (its toy.preference)."""
    code = "trust" if trust_code else "refuse"
    here = [f"output_dir={run}"]  # the run's folder, wherever it has moved since
    loop = SailLoop(
        load_recorded_config(run, here, code=code), log=log
    )  # the config the run recorded, its human included
    ctx = dataclasses.replace(
        loop.context_for(load_recorded_config(run, here + overrides, code=code)), out=run / variant
    )
    for stage in RunLayout(run).evaluated_stages():  # a soup (sail.soup) among them
        evaluate_stage(ctx, stage, loop.stage_policy(stage), heldout=None)  # skips a stage already evaluated
    return loop.sail.rounds


def sampler_transfer(
    out: str | Path,
    seeds: list[int],
    conditions: list[str],
    *,
    sampler: str = "ddpm",
    steps: int = 50,
    images_per_prompt: int | None = None,
    batch_size: int | None = None,
    compile: bool = False,
    log=print,
    trust_code: bool = False,
) -> Path:
    """Evaluate the finished stages of ``conditions`` (sail first: the others share its base) under
    ``sampler`` at ``steps``; returns the table (results-<sampler>-<steps>.md). ``batch_size``: samples per UNet
    call (``sail.generation_batch``), which changes the speed, not the samples. ``compile``: sample with a
    ``torch.compile``d UNet (``sail.compile``): one graph serves every stage's policy, the same samples to rounding
    (a batch size that divides the stage's samples spares a second graph for a shorter last batch)."""
    out, variant = Path(out), f"{sampler}-{steps}"
    # The label-quality diagnostic reads how the loop's own samples rank; the table reads none of it.
    overrides = [f"sail.sampler={sampler}", f"sail.sampling_steps={steps}", "sail.eval_label_quality=false"]
    if images_per_prompt is not None:
        overrides.append(f"sail.eval_images_per_prompt={images_per_prompt}")
    if batch_size is not None:
        overrides.append(f"sail.generation_batch={batch_size}")
    if compile:
        overrides.append("sail.compile=true")
    rounds = 0
    for seed in seeds:
        seed_dir = out / f"seed-{seed}"
        for name in sorted(conditions, key=lambda c: c != "sail"):
            run = seed_dir / name
            if not RunLayout(run).config.exists():
                log(f"{run}: no finished run there, skipped")
                continue
            if name != "sail":  # the same base samples as SAIL's (same prompts, seeds and weights)
                copy_finished(seed_dir / "sail" / variant, run / variant, *base_evaluation())
            rounds = max(rounds, evaluate_run_under(run, variant, overrides, log, trust_code=trust_code))
    return write_table(out, seeds, rounds, variant=variant)
