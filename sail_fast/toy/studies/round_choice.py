"""The stage a run keeps, read against the oracle (``sail-fast toy round-choice``): for toy experiments whose
``sail`` condition ran every round, each world's table of the stages with their round score (what the run
sees) beside the judged score against DPO on the same labels and on all of them, and the stage ``sail.select``
keeps and where ``sail.early_stop`` ends, both from the recorded round score by the loop's own functions.
"""

from __future__ import annotations

from pathlib import Path

from ...runs.layout import RunLayout
from ...sail.evaluation import metric_rows
from ...sail.selection import choose_stage, stop_reason
from .experiment import collect


def _pm(pair) -> str:
    return "-" if pair is None else f"{pair[0]:+.3f} ± {pair[1]:.3f}"


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if not isinstance(value, float) else format(value, fmt)


RULES = ("guarded", "loss")  # the default, and the first rule (bench/results/round_choice_plan.md)


def kept_and_stop(run: Path, rounds: int, rule: str, patience: int = 1) -> tuple[dict, int, str | None]:
    """What ``select: rule`` keeps of the run's recorded rows, after the rounds ``early_stop`` would have run."""
    rows = metric_rows(RunLayout(run), rounds)  # read once; what the loop saw after round r is a prefix of it
    last = max(RunLayout.round_of(row["stage"]) for row in rows)
    for r in range(1, last + 1):
        seen = [row for row in rows if RunLayout.round_of(row["stage"]) <= r]
        reason = stop_reason(seen, patience, rule=rule)
        if reason:
            return choose_stage(seen, rule), r, reason
    return choose_stage(rows, rule), last, None


def world_section(name: str, out: Path, seeds: list[int], rounds: int, variant: str = "") -> tuple[str, list[dict]]:
    """One world's table (markdown) and its per-seed picks."""
    lines = {(row["condition"], row["stage"]): row for row in collect(out, seeds, rounds, rounds, variant)}
    picks = []
    for seed in seeds:
        for rule in RULES:
            chosen, ran, reason = kept_and_stop(out / f"seed-{seed}" / "sail", rounds, rule)
            picks.append(
                {"world": name, "seed": seed, "rule": rule, "kept": chosen["stage"], "rounds_run": ran, "stop": reason}
            )
    head = (
        "| stage | score - DPO 6% | score - DPO 100% | accuracy - base | held-out DPO loss | held-out accuracy "
        "| drift | prompt consistency | pair margin | kept: guarded | kept: loss |"
    )
    md = [f"### {name}{f' ({variant})' if variant else ''}", "", head, "|---" * 11 + "|"]
    score_rows = {s: {r["stage"]: r for r in metric_rows(RunLayout(out / f"seed-{s}" / "sail"), rounds)} for s in seeds}
    stages = [(RunLayout.BASE, "sail", RunLayout.BASE)]
    stages += [("DPO 6%", "dpo-6", RunLayout.ITER0), ("DPO 100%", "dpo-full", RunLayout.ITER0)]
    stages += [(s, "sail", s) for s in RunLayout.stage_names(rounds)[1:]]
    for label, condition, stage in stages:
        row = lines.get((condition, stage))
        if row is None:
            continue
        score = [score_rows[s].get(stage, {}) for s in seeds] if condition == "sail" else []
        mean = {
            key: sum(r[key] for r in score) / len(score)
            for key in (
                "heldout_dpo_loss",
                "heldout_accuracy",
                "heldout_drift",
                "prompt_consistency",
                "reward_spread_mean",
            )
            if score and all(isinstance(r.get(key), float) for r in score)
        }
        kept = {rule: sum(p["kept"] == stage and p["rule"] == rule for p in picks) for rule in RULES}
        kept = {rule: n if condition == "sail" else 0 for rule, n in kept.items()}
        md.append(
            f"| {label} | {_pm(row.get('vs_dpo_6', {}).get('score'))} | {_pm(row.get('vs_dpo_full', {}).get('score'))} "
            f"| {_pm(row.get('vs_base', {}).get('correct'))} | {_cell(mean, 'heldout_dpo_loss', '.4f')} "
            f"| {_cell(mean, 'heldout_accuracy', '.3f')} | {_cell(mean, 'heldout_drift', '+.4f')} "
            f"| {_cell(mean, 'prompt_consistency', '.4f')} | {_cell(mean, 'reward_spread_mean', '.3f')} "
            f"| {kept['guarded'] or ''} | {kept['loss'] or ''} |"
        )
    return "\n".join(md), picks


def round_choice(worlds: dict[str, Path], seeds: list[int], rounds: int, variant: str = "") -> str:
    """Every world's section and the picks, as markdown."""
    parts, picks = [], []
    for name, out in worlds.items():
        text, mine = world_section(name, Path(out), seeds, rounds, variant)
        parts.append(text)
        picks += mine
    lines = ["| world | seed | rule | kept | rounds early stop runs | why it stops |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {p['world']} | {p['seed']} | {p['rule']} | {p['kept']} | {p['rounds_run']} of {rounds} | {p['stop'] or '-'} |"
        for p in picks
    ]
    return "\n\n".join(parts + ["\n".join(lines)]) + "\n"
