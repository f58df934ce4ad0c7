"""The toy world's headline table: SAIL against full-label Diffusion-DPO and the ablations,
over several seeds (``sail-fast toy experiment``).

Per seed, every condition reads the same human-labelled pairs (``<out>/seed-S/human``):

- ``sail``: iter0 on the seed pairs (``toy.seed_fraction`` of the labels), then the rounds;
  gives the base, iter0 and round 1..T rows.
- ``no-mixup``: the rounds with ``train.mixup_alpha = 1`` (generated pairs only), from the same iter0.
- ``random-pairs``: two random candidates per prompt (ordered by the implicit reward) instead of
  best vs worst, from the same iter0.
- ``dpo-full``: Diffusion-DPO on 100% of the labelled pairs, for as many optimizer steps as SAIL
  spends on iter0 plus all rounds.
- ``online-dpo``: OnlineDPO, the rounds ranked by an external reward model (here the noiseless
  oracle itself, so an upper bound on what any external scorer could give), from the same iter0.
- ``smpo``: SmPO-Diffusion: the oracle's soft labels, the smpo loss, DDIM-inversion noising.
- ``smoothed-self``: SAIL with smoothed self-labels (soft labels from the implicit reward).
- ``realalign``: RealAlign alone: real MNIST digits (captioned with training-pool prompts) beat the
  policy's own sample for the caption, mixed with the human seed like SAIL's pairs.
- ``sail-realalign``: SAIL's ranked pairs and RealAlign's pairs together in each round.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .config import load_config
from .loop import SailLoop

CONDITIONS = ("sail", "no-mixup", "random-pairs", "dpo-full", "online-dpo", "smpo", "smoothed-self", "realalign",
              "sail-realalign")
ORACLE_RANKER = ["sail.ranker=external", "sail.ranker_metric=toy_oracle"]
SOFT = ["sail.soft_labels=true", "train.loss=smpo"]


def condition_overrides(name: str, seed: int, seed_dir: Path, config, ablation_rounds: int | None = None) -> list[str]:
    """The ``--set`` overrides that turn the base config into one condition of one seed
    (``ablation_rounds``: run the two ablations for fewer rounds than SAIL, to save time)."""
    sail = config.sail
    common = [f"seed={seed}", f"output_dir={seed_dir / name}", f"toy.data_dir={seed_dir / 'human'}"]
    iter0 = f"sail.iter0_from={seed_dir / 'sail' / 'iter0'}"
    if name == "sail":
        return common
    # The ablations are compared at their last round only, so they skip the rounds between.
    ablation = [iter0, "sail.eval_each_round=false", f"sail.rounds={ablation_rounds or sail.rounds}"]
    if name == "no-mixup":
        return common + ablation + ["train.mixup_alpha=1.0"]
    if name == "random-pairs":
        return common + ablation + ["sail.pairing=random"]
    if name == "online-dpo":
        return common + ablation + ORACLE_RANKER
    if name == "smpo":
        return common + ablation + ORACLE_RANKER + SOFT + ["train.noising=ddim_inversion"]
    if name == "smoothed-self":
        return common + ablation + SOFT
    if name == "realalign":
        return common + ablation + ["sail.pair_sources=[real]"]
    if name == "sail-realalign":
        return common + ablation + ["sail.pair_sources=[self, real]"]
    if name == "dpo-full":
        steps = (sail.iter0_steps or config.train.steps) + sail.rounds * (sail.round_steps or config.train.steps)
        return common + ["toy.train_on=all", "sail.rounds=0", f"sail.iter0_steps={steps}"]
    raise ValueError(f"unknown condition {name!r}; choose from {CONDITIONS}")


def run_experiment(config_path: str | Path, out: str | Path, seeds: list[int], conditions=CONDITIONS,
                   overrides: list[str] | None = None, ablation_rounds: int | None = None) -> Path:
    """Run (or resume) every condition for every seed, then write the table; returns results.md."""
    out = Path(out)
    base = load_config(config_path, overrides)
    for seed in seeds:
        seed_dir = out / f"seed-{seed}"
        for name in conditions:
            extra = condition_overrides(name, seed, seed_dir, base, ablation_rounds)
            SailLoop(load_config(config_path, list(overrides or []) + extra)).run(resume=True)
    return write_table(out, seeds, base.sail.rounds, ablation_rounds or base.sail.rounds)


def _rows(run: Path) -> dict[str, dict]:
    file = run / "metrics.json"
    return {row["stage"]: row for row in json.loads(file.read_text())} if file.exists() else {}


def collect(out: Path, seeds: list[int], rounds: int, ablation_rounds: int) -> list[tuple[str, str, list[dict]]]:
    """(label, labels used, per-seed metric rows) for each line of the table."""
    last = f"round-{ablation_rounds:02d}"
    runs = {s: {c: _rows(out / f"seed-{s}" / c) for c in CONDITIONS} for s in seeds}

    def pick(condition, stage):
        return [runs[s][condition][stage] | {"seed": s} for s in seeds if stage in runs[s][condition]]

    human = json.loads((out / f"seed-{seeds[0]}" / "human" / "summary.json").read_text())
    seed_share = f"{human['seed']} ({100 * human['seed'] / human['labelled']:.0f}%)"
    lines = [("base model", "0", pick("sail", "base")),
             ("Diffusion-DPO, 100% of labels", f"{human['labelled']} (100%)", pick("dpo-full", "iter0")),
             ("SAIL iter0 (seed only)", seed_share, pick("sail", "iter0"))]
    lines += [(f"SAIL round {r}", seed_share, pick("sail", f"round-{r:02d}")) for r in range(1, rounds + 1)]
    lines += [(f"SAIL round {ablation_rounds}, no mixup (alpha = 1)", seed_share, pick("no-mixup", last)),
              (f"SAIL round {ablation_rounds}, random pairs", seed_share, pick("random-pairs", last))]
    others = [(f"SAIL round {ablation_rounds}, smoothed self-labels", seed_share, pick("smoothed-self", last)),
              (f"OnlineDPO round {ablation_rounds} (oracle ranks)", seed_share, pick("online-dpo", last)),
              (f"SmPO round {ablation_rounds} (oracle soft labels, DDIM inversion)", seed_share, pick("smpo", last)),
              (f"RealAlign round {ablation_rounds} (real digit vs own sample)", seed_share, pick("realalign", last)),
              (f"SAIL + RealAlign round {ablation_rounds}", seed_share, pick("sail-realalign", last))]
    return lines + [line for line in others if line[2]]  # the other systems only once they have run


def _mean_spread(values: list[float]) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}"


def write_table(out: Path, seeds: list[int], rounds: int, ablation_rounds: int | None = None) -> Path:
    """results.md and results.json: mean ± standard deviation over seeds for each line."""
    keys = ("oracle_score", "digit_accuracy", "self_label_agreement", "diversity")
    lines = collect(out, seeds, rounds, ablation_rounds or rounds)
    # Each seed has its own eval prompts and labels, so the paired change from that seed's base
    # is the sharper comparison.
    base = {r["seed"]: r["oracle_score"] for r in lines[0][2]}
    md = ["| model | human labels | " + " | ".join(k.replace("_", " ") for k in keys)
          + " | oracle score - base (same seed) | seeds |", "|---" * (len(keys) + 4) + "|"]
    data = []
    for label, budget, rows in lines:
        cells = [_mean_spread([r[k] for r in rows if r.get(k) is not None]) for k in keys]
        cells.append(_mean_spread([r["oracle_score"] - base[r["seed"]] for r in rows if r["seed"] in base]))
        md.append(f"| {label} | {budget} | " + " | ".join(cells) + f" | {len(rows)} |")
        data.append({"model": label, "human_labels": budget, "per_seed": rows})
    (out / "results.md").write_text("\n".join(md) + "\n")
    (out / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    _plot(out, lines)
    return out / "results.md"


def _plot(out: Path, lines) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for i, (label, _, rows) in enumerate(lines):
        values = [r["oracle_score"] for r in rows if "oracle_score" in r]
        if values:
            ax.scatter([i] * len(values), values, color="tab:blue", alpha=0.6)
            ax.plot([i - 0.3, i + 0.3], [sum(values) / len(values)] * 2, color="black")
    ax.set_xticks(range(len(lines)), [label for label, _, _ in lines], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("oracle score (hidden preference)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- calibration

# Full-label Diffusion-DPO settings swept to calibrate the toy world (never SAIL): (beta, learning rate).
CALIBRATION_GRID = ((5000.0, 1e-5), (5000.0, 3e-5), (5000.0, 1e-4), (2000.0, 3e-5), (2000.0, 1e-4))
CALIBRATION_STEPS = (100, 200)


def _seed_from(source: Path, target: Path, *names: str) -> None:
    """Copy finished parts of an earlier run (the base evaluation, training checkpoints) into ``target``."""
    import shutil

    for name in names:
        if (source / name).exists() and not (target / name).exists():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            copy = shutil.copytree if (source / name).is_dir() else shutil.copy
            copy(source / name, target / name)


def calibrate(config_path: str | Path, out: str | Path, *, seed: int = 0, grid=CALIBRATION_GRID,
              steps=CALIBRATION_STEPS, overrides: list[str] | None = None) -> Path:
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
                _seed_from(first, run, "base/eval.json", "base/eval_samples.safetensors")
            if previous is not None:
                _seed_from(previous, run, "iter0/checkpoints")
            extra = [f"seed={seed}", f"output_dir={run}", f"toy.data_dir={out / 'human'}", f"data.cache_dir={out / 'cache'}",
                     "toy.train_on=all", "sail.rounds=0", f"sail.iter0_steps={s}", f"train.beta={beta}",
                     f"train.learning_rate={lr}", f"train.checkpoint_every={min(steps)}", "train.keep_checkpoints=1"]
            SailLoop(load_config(config_path, list(overrides or []) + extra)).run(resume=True)
            first, previous = first or run, run
    return write_calibration(out, grid, steps)


def _delta(row: dict, key: str) -> tuple[float, float]:
    return tuple(row["vs_base"][key])


def write_calibration(out: Path, grid=CALIBRATION_GRID, steps=CALIBRATION_STEPS) -> Path:
    rows = []
    for beta, lr in grid:
        for s in steps:
            file = out / f"beta{beta:g}-lr{lr:g}-steps{s}" / "iter0" / "eval.json"
            if not file.exists():
                continue
            row = json.loads(file.read_text())
            train_log = file.parent / "metrics.jsonl"
            last = [json.loads(x) for x in train_log.read_text().splitlines()][-10:] if train_log.exists() else []
            rows.append({"beta": beta, "learning_rate": lr, "steps": s, "oracle_score": row["oracle_score"],
                         "digit_accuracy": row["digit_accuracy"], "diversity": row["diversity"],
                         "train_loss_last10": sum(x["loss"] for x in last) / len(last) if last else None,
                         "vs_base": row["vs_base"]})
    md = ["| beta | lr | steps | score | score - base (± SE) | in SE | accuracy - base | haze - base | width term - base "
          "| log p - base | offset - base | diversity | train loss |", "|---" * 13 + "|"]
    for r in rows:
        d, se = _delta(r, "score")
        cell = lambda k, f=".3f": "{:+{f}} ± {:{f}}".format(*_delta(r, k), f=f)  # noqa: E731
        loss = "-" if r["train_loss_last10"] is None else f"{r['train_loss_last10']:.3f}"
        md.append(f"| {r['beta']:g} | {r['learning_rate']:g} | {r['steps']} | {r['oracle_score']:.3f} | {d:+.3f} ± {se:.3f} "
                  f"| {d / se:+.1f} | {cell('correct')} | {cell('haze', '.4f')} | {cell('width_term')} | {cell('log_prob')} "
                  f"| {cell('offset', '.4f')} | {r['diversity']:.3f} | {loss} |")
    (out / "calibration.md").write_text("\n".join(md) + "\n")
    (out / "calibration.json").write_text(json.dumps(rows, indent=2) + "\n")
    return out / "calibration.md"
