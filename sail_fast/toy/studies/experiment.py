"""The toy world's headline table: SAIL against full-label Diffusion-DPO and the ablations,
over several seeds (``sail-fast toy experiment``), and the calibration sweep that fixes the
training regime on full-label Diffusion-DPO alone (``sail-fast toy calibrate``).

Every stage is evaluated on the same held-out prompts with the same noise seeds, so rows are
compared by paired differences with prompt-clustered standard errors (``sail_fast.metrics.statistics``).

Per seed, every condition reads the same human-labelled pairs (``<out>/seed-S/human``):

- ``sail``: iter0 on the seed pairs (``toy.seed_fraction`` of the labels), then the rounds;
  gives the base, iter0 and round 1..T rows.
- ``no-mixup``: the rounds with ``train.mixup_alpha = 1`` (generated pairs only), from the same iter0.
- ``random-pairs``: two random candidates per prompt (ordered by the implicit reward) instead of
  best vs worst, from the same iter0.
- ``dpo-6`` ... ``dpo-full``: Diffusion-DPO on the first 6, 12, 25, 50 or 100% of the labelled
  pairs (the label-efficiency curve), for as many optimizer steps as SAIL spends on iter0 plus all
  rounds.
- ``online-dpo-proxy``: OnlineDPO ranked by a one-aspect proxy reward model (``toy_width``: stroke
  width only, always bolder), as the paper's single Aesthetic scorer; from the same iter0.
- ``online-dpo``: OnlineDPO ranked by the noiseless human itself, an upper bound on what any
  external scorer could give; from the same iter0.
- ``ref-previous``: SAIL with the implicit reward's reference set to the previous round's policy
  instead of the base (a lever the paper offers), all rounds, from the same iter0.
- ``smpo``: SmPO-Diffusion: the oracle's soft labels, the smpo loss, DDIM-inversion noising.
- ``smoothed-self``: SAIL with smoothed self-labels (soft labels from the implicit reward).
- ``realalign``: RealAlign alone: real MNIST digits (captioned with training-pool prompts) beat the
  policy's own sample for the caption, mixed with the human seed like SAIL's pairs.
- ``sail-realalign``: SAIL's ranked pairs and RealAlign's pairs together in each round.
- ``smpo-published``: ``smpo`` with the authors' settings: the factor 10 beside beta, 5 inversion steps.
- ``realalign-recipe``: RealAlign's two stages with no human labels and no iter0: Diffusion-DRO rounds
  held to the base (real digit vs own DPM-Solver++ sample), then a Diffusion-DPO round on digits with
  their stroke redrawn, past the oracle's margin, on the oracle's top real digits every round.
- ``mixup-0.1``, ``candidates-16``, ``draws-12``: the paper's other levers, one at a time, for all
  rounds from the same iter0: a tenth of each batch from the round's pairs (0.25 by default), 16
  candidates per prompt (8), 12 noise draws per reward (6). A documented ablation, run after SAIL's
  rows were seen, never a retune of the default.
- ``winner-preserving``: Diffusion-SDPO's loser-gradient scale (mu 0.9) in every round, from the same
  iter0: does a step that may not raise the winners' loss stop the rounds' drift?
- ``plain-reward``: every round ranked by the implicit reward as the paper computes it (the mean gap
  over 6 uniform-t draws, the default before the reward audit), from the same iter0, every round
  evaluated: the configs' debiased reward (sail.reward_estimator) against the one it replaced.
- ``anchored``: every round's DPO held to the base model (``sail.training_reference: base``) instead of
  the policy the round starts from, from the same iter0, every round evaluated: the rounds' moves add up
  under one reference, the one the implicit reward already ranks against, so the loss saturates once
  the policy has moved as far from the base as the pairs support. The configs' default since the round choice
  (bench/results/round_choice_plan.md), so with them it repeats ``sail``.
- ``plain``: the paper's rounds, each round's DPO held to the policy the round starts from
  (``sail.training_reference: round_start``), from the same iter0, every round evaluated.
- ``frozen-judge``: every round's candidates ranked by iter0's implicit reward (``sail.frozen_judge: true``)
  instead of the sampling policy's, from the same iter0, every round evaluated: the rounds still sample
  from the improving policy, but cannot amplify a lean the human seed did not put in the reward.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

from ...runs.config import load_config
from ...runs.layout import RunLayout
from ...sail.loop import SailLoop

# Diffusion-DPO on a share of the labelled pairs (the label-efficiency curve): condition -> share.
DPO_SHARES = {"dpo-6": 0.06, "dpo-12": 0.12, "dpo-25": 0.25, "dpo-50": 0.5, "dpo-full": 1.0}
# The paper's levers, each run for every round from the same iter0 (condition -> its override).
# winner-preserving: Diffusion-SDPO's safeguard (no step may raise the winners' loss) on SAIL's rounds.
# plain-reward: the implicit reward as the paper computes it (mean over K=6 uniform draws, the old default).
LEVERS = {
    "mixup-0.1": ["train.mixup_alpha=0.1"],
    "candidates-16": ["sail.candidates=16"],
    "draws-12": ["sail.num_draws=12"],
    "winner-preserving": ["train.winner_preserving_mu=0.9"],
    "plain-reward": ["sail.reward_estimator=mean", "sail.num_draws=6", "sail.reward_timesteps=null"],
    "anchored": ["sail.training_reference=base"],
    "plain": ["sail.training_reference=round_start"],
    "frozen-judge": ["sail.frozen_judge=true"],
}
CONDITIONS = (
    "sail",
    *DPO_SHARES,
    "no-mixup",
    "random-pairs",
    "ref-previous",
    "smoothed-self",
    "online-dpo-proxy",
    "online-dpo",
    "smpo",
    "realalign",
    "sail-realalign",
    *LEVERS,
    "smpo-published",
    "realalign-recipe",
)
ORACLE_RANKER = ["sail.ranker=external", "sail.ranker_metric=toy_oracle"]
# The recorded table ran the smpo loss without SmPO-Diffusion's factor 10 beside beta (the toy's beta is
# calibrated on the plain DPO logit) and with 4 inversion steps; pinned so the table reproduces.
SOFT_PUBLISHED = ["sail.soft_labels=true", "train.loss=smpo"]
SOFT = SOFT_PUBLISHED + ["train.smpo_scale=1"]


def condition_overrides(name: str, seed: int, seed_dir: Path, config, ablation_rounds: int | None = None) -> list[str]:
    """The ``--set`` overrides that turn the base config into one condition of one seed
    (``ablation_rounds``: run the ablations and other systems for fewer rounds than SAIL, to save time)."""
    sail = config.sail
    common = [
        f"seed={seed}",
        f"output_dir={seed_dir / name}",
        f"toy.data_dir={seed_dir / 'human'}",
        f"data.cache_dir={seed_dir / 'cache'}",
        "sail.early_stop=false",  # every round runs and is reported; where early stop ends is read from the rows
    ]
    iter0 = f"sail.iter0_from={RunLayout(seed_dir / 'sail').stage(RunLayout.ITER0)}"
    if name == "sail":
        return common
    if name in DPO_SHARES:  # as many optimizer steps as SAIL spends on iter0 plus all its rounds
        steps = (sail.iter0_steps or config.train.steps) + sail.rounds * (sail.round_steps or config.train.steps)
        pairs = max(1, round(config.toy.labelled_pairs * DPO_SHARES[name]))
        return common + [
            "toy.train_on=all",
            f"data.max_seed_pairs={pairs}",
            "sail.rounds=0",
            f"sail.iter0_steps={steps}",
        ]
    if name == "ref-previous":  # the paper's reference lever: every round, each evaluated, from the same iter0
        return common + [iter0, "sail.ranking_reference=previous"]
    if name in LEVERS:  # as ref-previous: every round, each evaluated, from the same iter0
        return common + [iter0] + LEVERS[name]
    if name == "realalign-recipe":  # no iter0 and no human pairs: its own base-model start
        last = ablation_rounds or sail.rounds
        return common + [
            "sail.iter0_steps=0",
            f"sail.rounds={last}",
            "sail.eval_each_round=false",
            "sail.pair_sources=[real]",
            "train.mixup_alpha=1.0",
            "train.loss=dro",
            "sail.training_reference=base",
            "sail.real.disjoint=false",
            "sail.real.filter_metric=toy_oracle",
            f"sail.real.top_k={sail.prompts_per_round}",
            "sail.real.sampler=dpmsolver",
            "sail.real.sampling_steps=20",
            "sail.real.guidance_scale=1.0",
            f"sail.round_overrides={{{last}: [train.loss=sigmoid, sail.training_reference=round_start, "
            "sail.real.loser=inpaint, sail.real.min_margin=0.0]}",
        ]
    # The ablations are compared at their last round only, so they skip the rounds between.
    ablation = [iter0, "sail.eval_each_round=false", f"sail.rounds={ablation_rounds or sail.rounds}"]
    extra = {
        "no-mixup": ["train.mixup_alpha=1.0"],
        "random-pairs": ["sail.pairing=random"],
        "smoothed-self": SOFT,
        "online-dpo-proxy": ["sail.ranker=external", "sail.ranker_metric=toy_width"],
        "online-dpo": ORACLE_RANKER,
        "smpo": ORACLE_RANKER + SOFT + ["train.noising=ddim_inversion", "train.inversion_steps=4"],
        "smpo-published": ORACLE_RANKER + SOFT_PUBLISHED + ["train.noising=ddim_inversion"],
        "realalign": ["sail.pair_sources=[real]"],
        "sail-realalign": ["sail.pair_sources=[self, real]"],
    }
    if name not in extra:
        raise ValueError(f"unknown condition {name!r}; choose from {CONDITIONS}")
    return common + ablation + extra[name]


def run_experiment(
    config_path: str | Path,
    out: str | Path,
    seeds: list[int],
    conditions=CONDITIONS,
    overrides: list[str] | None = None,
    ablation_rounds: int | None = None,
) -> Path:
    """Run (or resume) every condition for every seed, then write the table; returns results.md."""
    out = Path(out)
    base = load_config(config_path, overrides)
    for seed in seeds:
        seed_dir = out / f"seed-{seed}"
        for name in conditions:
            # Every condition shares the seed's base evaluation (same prompts, seeds and weights); eval.json
            # goes last, as it marks the stage done.
            if name != "sail":
                copy_finished(seed_dir / "sail", seed_dir / name, *base_evaluation())
            extra = condition_overrides(name, seed, seed_dir, base, ablation_rounds)
            SailLoop(load_config(config_path, list(overrides or []) + extra)).run(resume=True)
    return write_table(out, seeds, base.sail.rounds, ablation_rounds or base.sail.rounds)


@functools.lru_cache(maxsize=None)  # every row pairs with the same base and full-DPO files: read each once
def _stage(run: Path, stage: str) -> tuple[dict, dict] | None:
    """(eval.json, per-sample tables) of one stage of one run, or None if it has not been evaluated."""
    from safetensors.torch import load_file

    layout = RunLayout(run)
    if not layout.eval_json(stage).exists() or not layout.eval_samples(stage).exists():
        return None
    return json.loads(layout.eval_json(stage).read_text()), load_file(layout.eval_samples(stage))


def forget_read_stages() -> None:
    """Drop the stages read so far: runs may have finished stages since the last table or page."""
    _stage.cache_clear()


def rows_of(out: Path, seeds: list[int], rounds: int, ablation_rounds: int) -> list[tuple[str, str, str, str]]:
    """(label, human labels, condition, stage) for each line of the table."""
    labelled = json.loads(RunLayout(out / f"seed-{seeds[0]}").human_pairs().summary.read_text())
    total, seed_pairs = labelled["labelled"], labelled["seed"]
    seed_share = f"{seed_pairs} ({100 * seed_pairs / total:.0f}%)"
    last, iter0, stage = RunLayout.stage_name(ablation_rounds), RunLayout.ITER0, RunLayout.stage_name
    lines = [("base model", "0", "sail", RunLayout.BASE)]
    for name, share in DPO_SHARES.items():
        pairs = max(1, round(total * share))
        lines.append((f"Diffusion-DPO, {100 * share:.0f}% of labels", f"{pairs} ({100 * share:.0f}%)", name, iter0))
    lines.append(("SAIL iter0 (seed only)", seed_share, "sail", iter0))
    lines += [(f"SAIL round {r}", seed_share, "sail", stage(r)) for r in range(1, rounds + 1)]
    lines += [
        (f"SAIL round {ablation_rounds}, no mixup (alpha = 1)", seed_share, "no-mixup", last),
        (f"SAIL round {ablation_rounds}, random pairs", seed_share, "random-pairs", last),
    ]
    lines += [
        (f"SAIL round {r}, reward reference = previous round", seed_share, "ref-previous", stage(r))
        for r in range(1, rounds + 1)
    ]
    lines += [
        (f"SAIL round {ablation_rounds}, smoothed self-labels", seed_share, "smoothed-self", last),
        (f"OnlineDPO round {ablation_rounds}, proxy ranker (stroke width)", seed_share, "online-dpo-proxy", last),
        (f"OnlineDPO round {ablation_rounds}, noiseless human ranks", seed_share, "online-dpo", last),
        (f"SmPO round {ablation_rounds} (human soft labels, DDIM inversion)", seed_share, "smpo", last),
        (f"RealAlign round {ablation_rounds} (real digit vs own sample)", seed_share, "realalign", last),
        (f"SAIL + RealAlign round {ablation_rounds}", seed_share, "sail-realalign", last),
        (
            f"SmPO round {ablation_rounds}, published settings (x10, 5 inversion steps)",
            seed_share,
            "smpo-published",
            last,
        ),
        (f"RealAlign recipe round {ablation_rounds} (DRO, then DPO on redrawn strokes)", "0", "realalign-recipe", last),
    ]
    lever_names = {
        "mixup-0.1": "mixup alpha 0.1",
        "candidates-16": "16 candidates",
        "draws-12": "12 noise draws",
        "winner-preserving": "SDPO winner-preserving (mu 0.9)",
        "plain-reward": "plain reward (mean of 6 uniform draws)",
        "anchored": "every round's DPO held to the base",
        "plain": "every round's DPO held to the policy it starts from (the paper's)",
        "frozen-judge": "every round ranked by iter0's reward (frozen judge)",
    }
    every_round = {"plain-reward", "anchored", "plain", "frozen-judge"}  # compared with SAIL round by round
    lines += [
        (f"SAIL round {r}, {lever_names[name]}", seed_share, name, stage(r))
        for name in LEVERS
        for r in (range(1, rounds + 1) if name in every_round else sorted({ablation_rounds, rounds}))
    ]
    return lines


def paired_stages(run: Path, stage: str, other_run: Path, other: str, key: str = "score") -> tuple[float, float] | None:
    """(mean, prompt-clustered SE) of ``stage``'s per-sample ``key`` minus ``other``'s, sampled on the same prompts and
    seeds; None where either has not been evaluated."""
    from ...metrics.statistics import paired_difference

    mine, theirs = _stage(run, stage), _stage(other_run, other)
    return None if mine is None or theirs is None else paired_difference(mine[1][key], theirs[1][key])


def _combine(per_seed: list[tuple[float, float]]) -> tuple[float, float]:
    """Mean over seeds of paired differences, and its SE (independent seeds: root sum of squares / S)."""
    mean = sum(m for m, _ in per_seed) / len(per_seed)
    return mean, math.sqrt(sum(se**2 for _, se in per_seed)) / len(per_seed)


def collect(out: Path, seeds: list[int], rounds: int, ablation_rounds: int, variant: str = "") -> list[dict]:
    """Every line of the table that has run: means over seeds, and paired differences (± SE) against
    the same seed's base and full-label DPO, sampled with the same prompts and noise. ``variant``: the
    stages' evaluation under another sampler (``sail_fast.toy.studies.sampler_transfer``), in each run's subfolder."""
    lines = (judged_row(out, seeds, *line, variant=variant) for line in rows_of(out, seeds, rounds, ablation_rounds))
    return [row for row in lines if row is not None]


def judged_row(
    out: Path, seeds: list[int], label: str, budget: str, condition: str, stage: str, variant: str = ""
) -> dict | None:
    """One line of the table (``collect``): ``condition``'s ``stage`` over the ``seeds`` that evaluated it, or
    None where none did."""
    from ...metrics.statistics import paired_difference

    found = {s: _stage(out / f"seed-{s}" / condition / variant, stage) for s in seeds}
    found = {s: v for s, v in found.items() if v is not None}
    if not found:
        return None
    row = {"model": label, "human_labels": budget, "condition": condition, "stage": stage, "seeds": sorted(found)}
    for key in (
        "oracle_score",
        "digit_accuracy",
        "haze",
        "width_term",
        "log_prob",
        "offset",
        "diversity",
        "self_label_agreement",
    ):
        values = [ev[key] for ev, _ in found.values() if ev.get(key) is not None]
        row[key] = sum(values) / len(values) if values else None
    against = {
        "base": ("sail", RunLayout.BASE),
        "dpo_6": ("dpo-6", RunLayout.ITER0),
        "dpo_full": ("dpo-full", RunLayout.ITER0),
    }
    if condition != "sail" and not RunLayout.is_soup(stage) and RunLayout.round_of(stage) > 0:  # an ablation
        # against SAIL's same round, same seeds
        against["sail"] = ("sail", stage)
    for other, (o_condition, o_stage) in against.items():
        pairs = {}
        for s, (_, samples) in found.items():
            theirs = _stage(out / f"seed-{s}" / o_condition / variant, o_stage)
            if theirs is not None:
                pairs[s] = {k: paired_difference(samples[k], theirs[1][k]) for k in ("score", "correct", "haze")}
        if pairs:
            row[f"vs_{other}"] = {k: _combine([p[k] for p in pairs.values()]) for k in ("score", "correct", "haze")}
    return row


def _pm(pair, fmt=".3f") -> str:
    return "-" if pair is None else f"{pair[0]:+{fmt}} ± {pair[1]:{fmt}}"


def write_table(
    out: Path, seeds: list[int], rounds: int, ablation_rounds: int | None = None, variant: str = ""
) -> Path:
    """results.md, results.json and results.png (the label-efficiency curve with SAIL beside it);
    results-<variant>.* for the stages' evaluation under another sampler."""
    forget_read_stages()
    lines = collect(out, seeds, rounds, ablation_rounds or rounds, variant)
    name = f"results-{variant}" if variant else "results"
    md = [
        "| model | human labels | score | score - base | score - DPO 6% | score - DPO 100% | score - SAIL same round "
        "| accuracy | accuracy - base | haze - base | width term | self-label agreement | diversity | seeds |",
        "|---" * 14 + "|",
    ]
    for r in lines:
        base, full, sail = r.get("vs_base", {}), r.get("vs_dpo_full", {}), r.get("vs_sail", {})
        agree = "-" if r["self_label_agreement"] is None else f"{r['self_label_agreement']:.3f}"
        md.append(
            f"| {r['model']} | {r['human_labels']} | {r['oracle_score']:.3f} | {_pm(base.get('score'))} "
            f"| {_pm(r.get('vs_dpo_6', {}).get('score'))} | {_pm(full.get('score'))} | {_pm(sail.get('score'))} "
            f"| {r['digit_accuracy']:.3f} | {_pm(base.get('correct'))} "
            f"| {_pm(base.get('haze'), '.4f')} | {r['width_term']:.3f} | {agree} | {r['diversity']:.3f} "
            f"| {len(r['seeds'])} |"
        )
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    (out / f"{name}.json").write_text(json.dumps(lines, indent=2) + "\n")
    _plot(out / f"{name}.png", lines)
    return out / f"{name}.md"


def _plot(path: Path, lines: list[dict]) -> None:
    """Score change from the base against the number of human labels: DPO's curve, SAIL's points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    dpo = [r for r in lines if r["condition"] in DPO_SHARES and "vs_base" in r]
    if dpo:
        xs = [int(r["human_labels"].split()[0]) for r in dpo]
        ys, es = zip(*(r["vs_base"]["score"] for r in dpo))
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label="Diffusion-DPO on a share of the labels")
    others = [r for r in lines if r["condition"] not in DPO_SHARES and r["stage"] != "base" and "vs_base" in r]
    for i, r in enumerate(others):
        x = int(r["human_labels"].split()[0]) * (1.04**i)  # spread the points that share a label budget
        ax.errorbar(
            [x], [r["vs_base"]["score"][0]], yerr=[r["vs_base"]["score"][1]], fmt="s", capsize=3, label=r["model"]
        )
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("human-labelled pairs")
    ax.set_ylabel("human score - base (paired, ± SE)")
    ax.legend(fontsize=6, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- calibration

# Full-label Diffusion-DPO settings swept to calibrate the toy world (never SAIL): (beta, learning rate).
CALIBRATION_GRID = ((5000.0, 1e-5), (5000.0, 3e-5), (5000.0, 1e-4), (2000.0, 3e-5), (2000.0, 1e-4))
CALIBRATION_STEPS = (100, 200)


def base_evaluation() -> list[Path]:
    """The base's evaluation files, relative to a run folder; eval.json last, as it marks the stage done."""
    layout = RunLayout(".")
    return [layout.eval_samples(RunLayout.BASE), layout.eval_json(RunLayout.BASE)]


def copy_finished(source: Path, target: Path, *names: str | Path) -> None:
    """Copy finished parts of an earlier run (the base evaluation, training checkpoints) into ``target``."""
    import shutil

    for name in names:
        if (source / name).exists() and not (target / name).exists():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            copy = shutil.copytree if (source / name).is_dir() else shutil.copy
            copy(source / name, target / name)


def calibrate(
    config_path: str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    grid=CALIBRATION_GRID,
    steps=CALIBRATION_STEPS,
    overrides: list[str] | None = None,
) -> Path:
    """Full-label Diffusion-DPO (all ``toy.labelled_pairs``) over ``grid`` x ``steps``; each run is
    evaluated paired against the base on the same 1,000 samples. Longer runs continue from the
    shorter one's checkpoint (the learning rate is constant after warm-up, so that is the same run).
    Writes calibration.md / calibration.json; returns calibration.md."""
    out = Path(out)
    first = None
    for beta, lr in grid:
        previous = None
        for s in steps:
            run = out / f"beta{beta:g}-lr{lr:g}-steps{s}"
            if first is not None:
                copy_finished(first, run, *base_evaluation())
            if previous is not None:
                copy_finished(previous, run, RunLayout(run).training(0).checkpoints.relative_to(run))
            extra = [
                f"seed={seed}",
                f"output_dir={run}",
                f"toy.data_dir={out / 'human'}",
                f"data.cache_dir={out / 'cache'}",
                "toy.train_on=all",
                "sail.rounds=0",
                f"sail.iter0_steps={s}",
                f"train.beta={beta}",
                f"train.learning_rate={lr}",
                f"train.checkpoint_every={min(steps)}",
                "train.keep_checkpoints=1",
            ]
            SailLoop(load_config(config_path, list(overrides or []) + extra)).run(resume=True)
            first, previous = first or run, run
    return write_calibration(out, grid, steps)


def _delta(row: dict, key: str) -> tuple[float, float]:
    return tuple(row["vs_base"][key])


def write_calibration(out: Path, grid=CALIBRATION_GRID, steps=CALIBRATION_STEPS) -> Path:
    rows = []
    for beta, lr in grid:
        for s in steps:
            layout = RunLayout(out / f"beta{beta:g}-lr{lr:g}-steps{s}")
            file = layout.eval_json(RunLayout.ITER0)
            if not file.exists():
                continue
            row = json.loads(file.read_text())
            train_log = layout.training(0).metrics
            last = [json.loads(x) for x in train_log.read_text().splitlines()][-10:] if train_log.exists() else []
            rows.append(
                {
                    "beta": beta,
                    "learning_rate": lr,
                    "steps": s,
                    "oracle_score": row["oracle_score"],
                    "digit_accuracy": row["digit_accuracy"],
                    "diversity": row["diversity"],
                    "train_loss_last10": sum(x["loss"] for x in last) / len(last) if last else None,
                    "vs_base": row["vs_base"],
                }
            )
    md = [
        "| beta | lr | steps | score | score - base (± SE) | in SE | accuracy - base | haze - base | width term - base "
        "| log p - base | offset - base | diversity | train loss |",
        "|---" * 13 + "|",
    ]
    for r in rows:
        d, se = _delta(r, "score")
        cell = lambda k, f=".3f": "{:+{f}} ± {:{f}}".format(*_delta(r, k), f=f)  # noqa: E731
        loss = "-" if r["train_loss_last10"] is None else f"{r['train_loss_last10']:.3f}"
        md.append(
            f"| {r['beta']:g} | {r['learning_rate']:g} | {r['steps']} | {r['oracle_score']:.3f} | {d:+.3f} ± {se:.3f} "
            f"| {d / se:+.1f} | {cell('correct')} | {cell('haze', '.4f')} | {cell('width_term')} | {cell('log_prob')} "
            f"| {cell('offset', '.4f')} | {r['diversity']:.3f} | {loss} |"
        )
    (out / "calibration.md").write_text("\n".join(md) + "\n")
    (out / "calibration.json").write_text(json.dumps(rows, indent=2) + "\n")
    return out / "calibration.md"
