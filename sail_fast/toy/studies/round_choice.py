"""The stage a run keeps, read against the oracle (``sail-fast toy round-choice``): for toy experiments whose
``sail`` condition (or a lever run every round, e.g. ``frozen-judge``) ran every round, each world's table of
the stages with their round score (what the run sees) beside the judged score against DPO on the same labels
and on all of them, the stage ``sail.select`` keeps and where ``sail.early_stop`` ends, both from the recorded
round score by the loop's own functions, and each seed's kept stage against the goal of issue 33: at least
DPO-6%, within 1 SE of DPO-100% or above it, digit accuracy within 1 point of the base. Runs made with
``sail.soup`` add the soup of guarded's stages as one more pick (``guarded + soup``). Runs evaluated before
eval.json recorded per-prompt consistency are read with what ``sail-fast toy consistency`` measured again.
"""

from __future__ import annotations

import math
from pathlib import Path

from ...runs.layout import RunLayout
from ...runs.run_folder import read_json
from ...sail.evaluation import metric_rows
from ...sail.label_quality import within_prompt_spearman
from ...sail.selection import choose_stage, stop_reason
from ...sail.soup import soup_rounds
from .consistency_backfill import with_backfill
from .experiment import collect, forget_read_stages, judged_row, paired_stages


def _pm(pair) -> str:
    return "-" if pair is None else f"{pair[0]:+.3f} ± {pair[1]:.3f}"


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if not isinstance(value, float) else format(value, fmt)


# The default, the first rule, and the candidates written after seeds 0-1, seed 2 and seed 3
# (bench/results/round_choice_plan.md)
RULES = ("guarded", "loss", "agreement", "paired", "tested")
ACCURACY_POINT = 0.01  # the goal's "digit accuracy within 1 point of the base"
GOAL_PARTS = ("at_least_dpo_6", "near_dpo_full", "accuracy_kept")  # goal()'s three flags
SOUP_RULE = (
    "guarded + soup"  # runs made with sail.soup: the soup of guarded's stages (round_choice_plan.md, addendum 12)
)


def kept_and_stop(rows: list[dict], rule: str, patience: int = 1) -> tuple[dict, int, str | None]:
    """What ``select: rule`` keeps of a run's recorded rows (``metric_rows``), after the rounds ``early_stop``
    would have run: what the loop saw after round r is a prefix of them."""
    last = max(RunLayout.round_of(row["stage"]) for row in rows)
    for r in range(1, last + 1):
        seen = [row for row in rows if RunLayout.round_of(row["stage"]) <= r]
        reason = stop_reason(seen, patience, rule=rule)
        if reason:
            return choose_stage(seen, rule), r, reason
    return choose_stage(rows, rule), last, None


def _judged(lines: dict, condition: str, stage: str) -> dict | None:
    """A stage's judged row: base and iter0 are the sail condition's (every lever starts from them)."""
    return lines.get(("sail" if RunLayout.round_of(stage) < 1 else condition, stage))


def goal(row: dict | None) -> dict:
    """The kept stage against the goal: (mean, SE) of each difference and whether each part is met."""
    if row is None:
        return {}
    dpo_6, dpo_full = row.get("vs_dpo_6", {}).get("score"), row.get("vs_dpo_full", {}).get("score")
    accuracy = row.get("vs_base", {}).get("correct")
    return {
        "vs_dpo_6": dpo_6,
        "vs_dpo_full": dpo_full,
        "accuracy_vs_base": accuracy,
        "at_least_dpo_6": None if dpo_6 is None else dpo_6[0] >= 0,
        "near_dpo_full": None if dpo_full is None else dpo_full[0] + dpo_full[1] >= 0,
        "accuracy_kept": None if accuracy is None else accuracy[0] >= -ACCURACY_POINT,
    }


def world_section(
    name: str, out: Path, seeds: list[int], rounds: int, variant: str = "", condition: str = "sail"
) -> tuple[str, list[dict]]:
    """One world's table (markdown) and its per-seed picks, each with its kept stage against the goal."""
    lines = {(row["condition"], row["stage"]): row for row in collect(out, seeds, rounds, rounds, variant)}
    picks = []
    layouts = {s: RunLayout(out / f"seed-{s}" / condition) for s in seeds}
    recorded = {s: with_backfill(layout, metric_rows(layout, rounds)) for s, layout in layouts.items()}  # read once
    for seed in seeds:
        alone = {(row["condition"], row["stage"]): row for row in collect(out, [seed], rounds, rounds, variant)}
        judged = {stage: _judged(alone, condition, stage) for stage in RunLayout.stage_names(rounds)}
        scores = {stage: row["vs_base"]["score"][0] for stage, row in judged.items() if row and "vs_base" in row}
        for rule in RULES:
            chosen, ran, reason = kept_and_stop(recorded[seed], rule)
            kept = chosen["stage"]
            picks.append(
                {"world": name, "seed": seed, "rule": rule, "kept": kept, "rounds_run": ran, "stop": reason}
                | goal(judged.get(kept))
                | {"regret": max(scores.values()) - scores[kept] if kept in scores else None}
            )
        if "soup_of" in _chosen(layouts[seed]):  # the run was made with sail.soup: its soup is read too
            picks.append(soup_pick(out, seed, recorded[seed], judged, scores, condition, variant) | {"world": name})
    head = (
        "| stage | score - DPO 6% | score - DPO 100% | accuracy - base | held-out DPO loss | held-out accuracy "
        "| drift | prompt consistency | pair margin | agreement (ranking's estimator) | "
        + " | ".join(f"kept: {rule}" for rule in RULES)
        + " |"
    )
    title = ", ".join(([] if condition == "sail" else [condition]) + ([variant] if variant else []))
    md = [f"### {name}{f' ({title})' if title else ''}", "", head, "|---" * (10 + len(RULES)) + "|"]
    score_rows = {s: {r["stage"]: r for r in rows} for s, rows in recorded.items()}
    stages = [(RunLayout.BASE, "sail", RunLayout.BASE)]
    stages += [("DPO 6%", "dpo-6", RunLayout.ITER0), ("DPO 100%", "dpo-full", RunLayout.ITER0)]
    stages += [(s, condition, s) for s in RunLayout.stage_names(rounds)[1:]]
    for label, source, stage in stages:
        row = _judged(lines, source, stage) if source == condition else lines.get((source, stage))
        if row is None:
            continue
        score = [score_rows[s].get(stage, {}) for s in seeds] if source == condition or stage == RunLayout.BASE else []
        mean = {
            key: sum(r[key] for r in score) / len(score)
            for key in (
                "heldout_dpo_loss",
                "heldout_accuracy",
                "heldout_drift",
                "prompt_consistency",
                "reward_spread_mean",
                "self_label_agreement",
            )
            if score and all(isinstance(r.get(key), float) for r in score)
        }
        kept = {rule: sum(p["kept"] == stage and p["rule"] == rule for p in picks) for rule in RULES}
        kept = {rule: n if source == condition or stage == RunLayout.BASE else 0 for rule, n in kept.items()}
        md.append(
            f"| {label} | {_pm(row.get('vs_dpo_6', {}).get('score'))} | {_pm(row.get('vs_dpo_full', {}).get('score'))} "
            f"| {_pm(row.get('vs_base', {}).get('correct'))} | {_cell(mean, 'heldout_dpo_loss', '.4f')} "
            f"| {_cell(mean, 'heldout_accuracy', '.3f')} | {_cell(mean, 'heldout_drift', '+.4f')} "
            f"| {_cell(mean, 'prompt_consistency', '.4f')} | {_cell(mean, 'reward_spread_mean', '.3f')} "
            f"| {_cell(mean, 'self_label_agreement', '.3f')} | "
            + " | ".join(str(kept[rule] or "") for rule in RULES)
            + " |"
        )
    return "\n".join(md), picks


def _chosen(layout: RunLayout) -> dict:
    return read_json(layout.chosen) if layout.chosen.is_file() else {}


def soup_pick(out: Path, seed: int, rows: list[dict], judged: dict, scores: dict, condition: str, variant: str) -> dict:
    """``select: guarded`` under ``sail.soup`` (``SOUP_RULE``): the soup of iter0..the stage guarded keeps, judged
    like a stage (its regret against the best single stage can be negative); guarded's own stage where that is the
    base or iter0."""
    chosen, ran, reason = kept_and_stop(rows, "guarded")
    rounds = soup_rounds(chosen["stage"])
    kept = RunLayout.soup_name(rounds[-1]) if rounds else chosen["stage"]
    row = judged_row(out, [seed], "soup", "", condition, kept, variant) if rounds else judged.get(kept)
    score = (row or {}).get("vs_base", {}).get("score")
    runs = {c: out / f"seed-{seed}" / c / variant for c in ("sail", condition)}
    selected = runs["sail" if RunLayout.round_of(chosen["stage"]) < 1 else condition]
    return (
        {"seed": seed, "rule": SOUP_RULE, "kept": kept, "rounds_run": ran, "stop": reason, "selected": chosen["stage"]}
        | goal(row)
        | {"regret": max(scores.values()) - score[0] if score and scores else None}
        | {"vs_selected": paired_stages(runs[condition], kept, selected, chosen["stage"]) if rounds else (0.0, 0.0)}
    )


def soup_table(picks: list[dict]) -> str:
    """Each soup against the stage guarded keeps, paired on the same samples' seeds: addendum 12's test is whether it
    rises in more world-seeds than it falls."""
    lines = ["| world | seed | guarded keeps | soup | soup - guarded's stage |", "|---|---|---|---|---|"]
    lines += [
        f"| {p['world']} | {p['seed']} | {p['selected']} | {p['kept']} | {_pm(p.get('vs_selected'))} |"
        for p in picks
        if p["rule"] == SOUP_RULE
    ]
    return "\n".join(lines)


TRACKED = {  # run-visible columns, and the name the page gives them
    "heldout_dpo_loss": "held-out DPO loss",
    "heldout_accuracy": "held-out accuracy",
    "heldout_drift": "drift",
    "prompt_consistency": "prompt consistency",
    "prompt_choice_accuracy": "prompt choice",
    "self_label_agreement": "agreement (ranking's estimator)",
}


def tracking(worlds: dict[str, Path], seeds: list[int], rounds: int, condition: str = "sail") -> str:
    """Within each run, the Spearman correlation over its trained stages (iter0, rounds) of each run-visible
    column with the judge's score: which of them could find the best stage."""
    lines = ["| world | seed | " + " | ".join(TRACKED.values()) + " |", "|---" * (2 + len(TRACKED)) + "|"]
    totals = {key: [] for key in TRACKED}
    for name, out in worlds.items():
        for seed in seeds:
            rows = metric_rows(RunLayout(Path(out) / f"seed-{seed}" / condition), rounds)
            rows = [row for row in rows if RunLayout.round_of(row["stage"]) >= 0]
            cells = []
            for key in TRACKED:
                pairs = [(row[key], row["oracle_score"]) for row in rows if isinstance(row.get(key), float)]
                rho = (
                    within_prompt_spearman([[a for a, _ in pairs]], [[b for _, b in pairs]]) if len(pairs) > 2 else None
                )
                if rho is None or math.isnan(rho):  # too few stages, or a column that never moved
                    cells.append("-")
                    continue
                totals[key].append(rho)
                cells.append(f"{rho:+.2f}")
            lines.append(f"| {name} | {seed} | " + " | ".join(cells) + " |")
    means = [f"{sum(v) / len(v):+.2f}" if v else "-" for v in totals.values()]
    lines.append("| mean | | " + " | ".join(means) + " |")
    return "\n".join(lines)


def _met(flag: bool | None) -> str:
    return "-" if flag is None else "met" if flag else "missed"


def round_choice(
    worlds: dict[str, Path], seeds: list[int], rounds: int, variant: str = "", condition: str = "sail"
) -> str:
    """Every world's section, the picks, and each seed's kept stage against the goal, as markdown."""
    forget_read_stages()
    parts, picks = [], []
    for name, out in worlds.items():
        text, mine = world_section(name, Path(out), seeds, rounds, variant, condition)
        parts.append(text)
        picks += mine
    lines = ["| world | seed | rule | kept | rounds early stop runs | why it stops |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {p['world']} | {p['seed']} | {p['rule']} | {p['kept']} | {p['rounds_run']} of {rounds} | {p['stop'] or '-'} |"
        for p in picks
    ]
    goals = [
        "| world | seed | rule | kept | score - DPO 6% | score - DPO 100% | accuracy - base "
        "| >= DPO 6% | within 1 SE of DPO 100% or above | accuracy within 1 point | regret |",
        "|---" * 11 + "|",
    ]
    goals += [
        f"| {p['world']} | {p['seed']} | {p['rule']} | {p['kept']} | {_pm(p.get('vs_dpo_6'))} "
        f"| {_pm(p.get('vs_dpo_full'))} | {_pm(p.get('accuracy_vs_base'))} | {_met(p.get('at_least_dpo_6'))} "
        f"| {_met(p.get('near_dpo_full'))} | {_met(p.get('accuracy_kept'))} | {_cell(p, 'regret', '.3f')} |"
        for p in picks
    ]
    parts += ["\n".join(lines), "\n".join(goals), rule_summary(picks)]
    if any(p["rule"] == SOUP_RULE for p in picks):
        parts.append(soup_table(picks))
    parts.append(tracking(worlds, seeds, rounds, condition))
    return "\n\n".join(parts) + "\n"


def rule_summary(picks: list[dict]) -> str:
    """Each rule over every world-seed: the parts of the goal met, the world-seeds meeting all three, and the
    mean regret (the best stage's judged score minus the kept one's): the bar of the plan's addendum 4."""
    lines = ["| rule | world-seeds | goal parts met | all three met | mean regret |", "|---|---|---|---|---|"]
    for rule in dict.fromkeys(p["rule"] for p in picks):
        mine = [p for p in picks if p["rule"] == rule]
        parts = [p.get(k) for p in mine for k in GOAL_PARTS]
        regrets = [p["regret"] for p in mine if p.get("regret") is not None]
        whole = sum(all(p.get(k) for k in GOAL_PARTS) for p in mine)
        mean = f"{sum(regrets) / len(regrets):.3f}" if regrets else "-"
        lines.append(f"| {rule} | {len(mine)} | {sum(bool(x) for x in parts)} of {len(parts)} | {whole} | {mean} |")
    return "\n".join(lines)
