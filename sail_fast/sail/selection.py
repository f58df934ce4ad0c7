"""Which stage a run keeps, and when its rounds stop: ``sail.select`` and ``sail.early_stop``.

Both read the round score only (``round_score``), never a judge, so a real run can apply them. The record of
how the rules were chosen, and what they gave on the toy's hidden humans, is bench/results/round_choice_plan.md
and round_choice.md.

- A stage **keeps its prompt** when its prompt consistency is at least ``1 - CONSISTENCY_TOLERANCE`` of the
  base's. The tolerance is what one point of the toy's digit accuracy costs in consistency when the base loses
  legibility for a reason that has nothing to do with a preference (a lower guidance scale,
  bench/round_score_guard.py).
- ``select: guarded`` (the default) keeps the last stage of the unbroken run of **sound** stages from iter0 on.
  A stage is sound when it keeps its prompt and its reward still ranks the held-out human pairs better than
  chance (``heldout_accuracy`` > 0.5). If iter0 is not sound, the run keeps the base.
- ``select: paired`` is ``guarded`` with the prompt test read the way the toy's page reads a score: a stage
  loses its prompt only if its per-prompt consistency (``prompt_consistency_by_prompt``) falls below the base's,
  prompt by prompt on the same samples' seeds and draws, by more than ``PAIRED_SE`` standard errors of that
  paired mean and by more than the tolerance of the base's. The threshold alone fired on sampling noise at iter0
  on seed 2, it seemed (the base's own consistency moves 0.007 from seed to seed, more than 3.5% of it). Written
  after seed 2 and tested on seed 3 (round_choice_plan.md, addenda 6-8): the paired drops are precise, the
  ones that stopped seed 2 were real, and it kept the base in all three worlds, so it is not the default.
  Where a row has no per-prompt values it falls back to the threshold.
- ``select: tested`` is ``guarded`` with both guards tested against their noise (round_choice_plan.md,
  addendum 9, written before any run was read under it). The prompt guard reads the base's prompt choice
  (``prompt_choice_by_prompt``: the share of each prompt's samples whose own prompt gives the base its lowest
  error), paired prompt by prompt with the base's; a stage loses its prompt only if the drop exceeds
  ``PAIRED_SE`` standard errors and ``CHOICE_TOLERANCE``. A common rise of the base's error under every
  prompt (a new style) lowers the consistency ratio but not the choice. The held-out guard fails a stage only
  if its held-out accuracy is below chance by more than ``PAIRED_SE`` of chance's standard error over the
  ``heldout_pairs`` it was measured on. Rows without per-prompt choices fall back to an unpaired drop of
  ``CHOICE_TOLERANCE`` in ``prompt_choice_accuracy``; rows without the pair count, to ``guarded``'s 0.5.
- ``select: loss`` (the first rule, fixed before the runs) keeps the stage, among those that keep their
  prompt, with the lowest held-out DPO loss against the base; the base (log 2) is a candidate. On the toy it
  kept the base everywhere: at beta 5000 the implicit reward's margins on the held-out pairs are several times
  larger than the labels support from iter0 on, so the loss rises with any training (round_choice.md).
- ``select: agreement`` keeps, within ``guarded``'s unbroken run of sound stages, the one whose reward agrees
  most with the held-out human pairs under the estimator the rounds rank with (``self_label_agreement``); the
  earlier stage on ties. Written after seeds 0-1; on seed 2 it kept what ``guarded`` kept, so it failed its
  test (round_choice_plan.md, addendum 4) and is not the default.
- ``select: last`` keeps the last round, as the paper does.
- ``early_stop`` ends the rounds after a round that is not sound (``guarded``, ``paired``, ``tested``, ``last``;
  each with its own tests), or, under
  ``loss``, also once ``sail.patience`` rounds in a row have not lowered the best held-out loss.
"""

from __future__ import annotations

import math

from ..runs.layout import RunLayout

# The relative drop in prompt consistency that one point of digit accuracy costs when the base loses legibility
# for no preference's sake (lower guidance; bench/round_score_guard.py -> bench/results/round_score_guard.json:
# 3.5% per point, least squares over guidance 7.5 / 4 / 2), fixed before any round of the report was read.
CONSISTENCY_TOLERANCE = 0.035
# select: paired counts a consistency drop only beyond this many standard errors of its paired mean (a two-sided
# 5% test; fixed in addendum 6 before seed 3 ran, not fitted to seeds 0-2).
PAIRED_SE = 2.0
# select: tested's prompt guard: the drop in the base's prompt choice accuracy (a share, absolute) that one point of
# digit accuracy costs under the same guidance intervention: 1.99 points per point, least squares through the
# origin over guidance 7.5 / 4 / 2 (round_score_guard.json; fixed in addendum 9 before any run was read with it).
CHOICE_TOLERANCE = 0.020
LOSS = "heldout_dpo_loss"
ACCURACY = "heldout_accuracy"
CONSISTENCY = "prompt_consistency"
BY_PROMPT = "prompt_consistency_by_prompt"
CHOICE = "prompt_choice_accuracy"
CHOICE_BY_PROMPT = "prompt_choice_by_prompt"
HELDOUT_PAIRS = "heldout_pairs"
AGREEMENT = "self_label_agreement"


def _scored(rows: list[dict]) -> list[dict]:
    return [row for row in rows if isinstance(row.get(LOSS), float) and math.isfinite(row[LOSS])]


def _base(rows: list[dict]) -> dict | None:
    return next((row for row in rows if row["stage"] == RunLayout.BASE), None)


def paired_drop(row: dict, base: dict | None, key: str = BY_PROMPT) -> tuple[float, float, float] | None:
    """(drop, its SE, the base's mean) of a stage's per-prompt values ``key`` against the base's, paired prompt by
    prompt; None when either row has no per-prompt values (or they are not for the same prompts)."""
    ours, theirs = row.get(key), (base or {}).get(key)
    if not isinstance(ours, list) or not isinstance(theirs, list) or len(ours) != len(theirs) or len(ours) < 2:
        return None
    for name, values in ((row["stage"], ours), (RunLayout.BASE, theirs)):
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise ValueError(f"{name}: {key} must hold finite numbers; evaluate that stage again")
    drops = [b - a for a, b in zip(ours, theirs)]
    mean = sum(drops) / len(drops)
    se = math.sqrt(sum((d - mean) ** 2 for d in drops) / (len(drops) - 1) / len(drops))
    return mean, se, sum(theirs) / len(theirs)


def consistency_drop(row: dict, base: dict | None) -> tuple[float, float, float] | None:
    """``paired_drop`` of the per-prompt consistency (``select: paired``)."""
    return paired_drop(row, base, BY_PROMPT)


def admissible(row: dict, base: dict | None, tolerance: float = CONSISTENCY_TOLERANCE, paired: bool = False) -> bool:
    """Whether a stage's samples keep their prompt by the consistency ratio (``guarded``, ``loss``; ``paired``: the
    drop must also exceed ``PAIRED_SE`` of its SE); True when either side is unknown."""
    drop = consistency_drop(row, base) if paired else None
    if drop is not None:
        mean, se, base_mean = drop
        return not (mean > PAIRED_SE * se and mean > tolerance * base_mean)
    ours, theirs = row.get(CONSISTENCY), (base or {}).get(CONSISTENCY)
    if not isinstance(ours, float) or not isinstance(theirs, float) or not theirs > 0:
        return True
    return ours >= (1.0 - tolerance) * theirs


def lost_prompt(row: dict, base: dict | None, rule: str, tolerance: float = CONSISTENCY_TOLERANCE) -> str | None:
    """Why a stage's samples no longer show their prompt under ``rule``'s prompt test (None: they do)."""
    if rule == "tested":
        drop = paired_drop(row, base, CHOICE_BY_PROMPT)
        if drop is not None:
            mean, se, _ = drop
            if mean > PAIRED_SE * se and mean > CHOICE_TOLERANCE:
                return (
                    f"{row['stage']}'s prompt choice accuracy fell {mean:.3f} ± {se:.3f} (SE) below the base's, "
                    f"prompt by prompt: more than {PAIRED_SE:g} SE and {CHOICE_TOLERANCE:.3f}"
                )
            return None
        ours, theirs = row.get(CHOICE), (base or {}).get(CHOICE)
        if isinstance(ours, float) and isinstance(theirs, float) and theirs - ours > CHOICE_TOLERANCE:
            return f"{row['stage']}'s prompt choice accuracy fell more than {CHOICE_TOLERANCE:.3f} ({ours:.3f} against {theirs:.3f})"
        return None
    paired = rule == "paired"
    drop = consistency_drop(row, base) if paired else None
    if admissible(row, base, tolerance, paired):
        return None
    if drop is not None:
        return (
            f"{row['stage']}'s prompt consistency fell {drop[0]:.4f} ± {drop[1]:.4f} (SE) below the base's, prompt by "
            f"prompt: more than {PAIRED_SE:g} SE and {tolerance:.1%} of the base's {drop[2]:.4f}"
        )
    return (
        f"{row['stage']} kept less than {1 - tolerance:.1%} of the base's prompt consistency "
        f"({row[CONSISTENCY]:.4f} against {base[CONSISTENCY]:.4f})"
    )


def chance_floor(row: dict, rule: str) -> float:
    """The held-out accuracy a sound stage must exceed: 0.5, or under ``tested`` chance less ``PAIRED_SE`` of
    chance's standard error over the row's ``heldout_pairs`` (0.5 where the count is not recorded)."""
    pairs = row.get(HELDOUT_PAIRS)
    if rule != "tested" or not isinstance(pairs, int) or isinstance(pairs, bool) or pairs < 1:
        return 0.5
    return 0.5 - PAIRED_SE * 0.5 / math.sqrt(pairs)


def unsound(
    row: dict, base: dict | None, rule: str = "guarded", tolerance: float = CONSISTENCY_TOLERANCE
) -> str | None:
    """Why a trained stage is not sound under ``rule`` (None: it is): it lost its prompt, or its reward no longer
    ranks the held-out human pairs better than chance."""
    why = lost_prompt(row, base, rule, tolerance)
    if why:
        return why
    accuracy, floor = row.get(ACCURACY), chance_floor(row, rule)
    if isinstance(accuracy, float) and floor == 0.5 and not accuracy > 0.5:
        return f"{row['stage']} ranks the held-out human pairs no better than chance (accuracy {accuracy:.3f})"
    if isinstance(accuracy, float) and accuracy < floor:
        return (
            f"{row['stage']} ranks the held-out human pairs worse than chance (accuracy {accuracy:.3f}, below "
            f"{floor:.3f}: {PAIRED_SE:g} SE under 0.5 at {row[HELDOUT_PAIRS]} pairs)"
        )
    return None


def choose_stage(rows: list[dict], rule: str = "guarded", tolerance: float = CONSISTENCY_TOLERANCE) -> dict:
    """The stage ``rule`` keeps from ``metric_rows`` (one per evaluated stage, in the loop's order), with why."""
    if not rows:
        raise ValueError("no stage has been evaluated yet: nothing to choose from")
    last = rows[-1]
    if rule == "last":
        return {"stage": last["stage"], "rule": rule, "reason": "sail.select: last keeps the last stage"}
    if rule in ("paired", "tested"):
        return _guarded(rows, tolerance, rule)
    if rule in ("guarded", "agreement"):
        guarded = _guarded(rows, tolerance)
        return guarded if rule == "guarded" else _agreement(rows, guarded)
    base = _base(rows)
    scored = _scored(rows)
    if not scored:
        return {
            "stage": last["stage"],
            "rule": rule,
            "reason": "no stage has a held-out score (no held-out human pairs): the last stage is kept",
        }
    kept = [row for row in scored if admissible(row, base, tolerance)]
    best = min(kept, key=lambda row: row[LOSS])  # min() keeps the first of equals: the earlier stage
    dropped = [row["stage"] for row in scored if row not in kept]
    reason = f"lowest held-out DPO loss against the base ({best[LOSS]:.4f}) of the stages that keep their prompt"
    if dropped:
        reason += f"; {', '.join(dropped)} lost more than {tolerance:.1%} of the base's prompt consistency"
    return {"stage": best["stage"], "rule": rule, "reason": reason}


def _guarded(rows: list[dict], tolerance: float, rule: str = "guarded") -> dict:
    base = _base(rows)
    kept, why = RunLayout.BASE if base is not None else rows[0]["stage"], None
    for row in rows:
        if RunLayout.round_of(row["stage"]) < 0:
            continue
        why = unsound(row, base, rule, tolerance)
        if why:
            break
        kept = row["stage"]
    reason = "the last stage of the unbroken run of sound ones (prompt kept, held-out accuracy above chance)"
    return {"stage": kept, "rule": rule, "reason": reason + (f"; {why}" if why else "")}


def _agreement(rows: list[dict], guarded: dict) -> dict:
    """The most agreeing stage from iter0 up to the one ``guarded`` keeps (guarded's choice where none is scored)."""
    names = [row["stage"] for row in rows]
    window = [row for row in rows[: names.index(guarded["stage"]) + 1] if RunLayout.round_of(row["stage"]) >= 0]
    scored = [row for row in window if isinstance(row.get(AGREEMENT), float)]
    if not scored:
        return guarded | {"rule": "agreement"}
    best = max(scored, key=lambda row: row[AGREEMENT])  # max() keeps the first of equals: the earlier stage
    reason = (
        f"the highest held-out agreement under the ranking's estimator ({best[AGREEMENT]:.3f}) of the sound stages "
        f"up to {guarded['stage']}"
    )
    return {"stage": best["stage"], "rule": "agreement", "reason": reason}


def stop_reason(
    rows: list[dict], patience: int, tolerance: float = CONSISTENCY_TOLERANCE, rule: str = "guarded"
) -> str | None:
    """Why the loop should stop after the last row's round (None: go on)."""
    if not rows or RunLayout.round_of(rows[-1]["stage"]) < 1:
        return None
    last, base = rows[-1], _base(rows)
    if rule != "loss":
        return unsound(last, base, rule, tolerance)
    scored = _scored(rows)
    if not scored or scored[-1] is not last:
        return None
    if not admissible(last, base, tolerance):
        return unsound(last, base, "guarded", tolerance)
    best = min(scored, key=lambda row: row[LOSS])
    since = RunLayout.round_of(last["stage"]) - RunLayout.round_of(best["stage"])
    if since >= patience:
        return f"the held-out DPO loss has not improved on {best['stage']}'s ({best[LOSS]:.4f}) for {since} round(s)"
    return None
