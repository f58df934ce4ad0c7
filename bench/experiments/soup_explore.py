"""Exploratory check of addendum 12's lever (bench/results/round_choice_plan.md): the uniform weight average
of iter0..round-LAST of a finished toy experiment's SAIL run, evaluated like a stage (the run's own sampler,
eval seeds and judge) into SEED_DIR/soup-explore/, then paired with the run's stages and its DPO-6% and
DPO-100% evaluations on the same samples' seeds. Not a test of the lever: see the addendum.

    python bench/experiments/soup_explore.py exp/thin-default/seed-1 4 [--trust-code] [--sampler ddpm --steps 50]

With --sampler, the soup is sampled under that sampler and paired with the stages' `toy transfer` evaluations
(``<run>/<sampler>-<steps>/``), which must exist.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from safetensors.torch import load_file

from sail_fast.metrics.statistics import paired_difference
from sail_fast.runs.layout import RunLayout
from sail_fast.runs.run_folder import load_recorded_config
from sail_fast.sail.evaluation import evaluate_stage
from sail_fast.sail.loop import SailLoop
from sail_fast.sail.soup import weight_average


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("seed_dir", type=Path, help="a toy experiment's seed-N folder (sail, dpo-6, dpo-full)")
    parser.add_argument("last", type=int, help="the last round in the average (iter0 is round 0)")
    parser.add_argument("--trust-code", action="store_true", help="run the preference code the run's config names")
    parser.add_argument("--sampler", help="another sampler, as in `sail-fast toy transfer` (default: the run's own)")
    parser.add_argument("--steps", type=int, default=50, help="its sampling steps")
    args = parser.parse_args()
    run, code = args.seed_dir / "sail", "trust" if args.trust_code else "refuse"
    here = [f"output_dir={run}"]
    loop = SailLoop(load_recorded_config(run, here, code=code), log=print)
    overrides, variant = ["sail.eval_label_quality=false"], ""
    if args.sampler:
        variant = f"{args.sampler}-{args.steps}"
        overrides += [f"sail.sampler={args.sampler}", f"sail.sampling_steps={args.steps}", "sail.generation_batch=64"]
    config = load_recorded_config(run, here + overrides, code=code)
    ctx = dataclasses.replace(loop.context_for(config), out=args.seed_dir / "soup-explore" / variant)
    name = RunLayout.soup_name(args.last)
    soup = weight_average(loop.policies, [loop.policy_dir(r) for r in range(args.last + 1)])
    evaluate_stage(ctx, name, soup, heldout=None)
    mine = load_file(ctx.layout.eval_samples(name))
    others = {s: RunLayout(run / variant).eval_samples(s) for s in RunLayout.stage_names(args.last)}
    others |= {
        "DPO 6%": RunLayout(args.seed_dir / "dpo-6" / variant).eval_samples(RunLayout.ITER0),
        "DPO 100%": RunLayout(args.seed_dir / "dpo-full" / variant).eval_samples(RunLayout.ITER0),
    }
    for other, file in others.items():
        theirs = load_file(file)
        (score, score_se), (acc, acc_se) = (paired_difference(mine[k], theirs[k]) for k in ("score", "correct"))
        print(f"{name} - {other}: score {score:+.3f} ± {score_se:.3f}, digit accuracy {acc:+.3f} ± {acc_se:.3f}")


if __name__ == "__main__":
    main()
