"""Which stage a run keeps, and when its rounds stop paying: ``sail.select`` and ``sail.early_stop``.

Both read the round score only (``round_score``: the held-out human pairs' DPO loss against the base, and
the samples' prompt consistency under the base), never a judge, so a real run can apply them. The rule and
its reasons were fixed before the runs that report it (bench/results/round_choice_plan.md):

- A stage is **admissible** when its prompt consistency keeps at least ``1 - CONSISTENCY_TOLERANCE`` of the
  base's: its samples still show their prompt about as well as the base's do. The tolerance is what one
  point of the toy's digit accuracy costs in consistency when the base loses legibility for a reason that
  has nothing to do with a preference (a lower guidance scale, bench/round_score_guard.py).
- ``select: auto`` keeps the admissible stage with the lowest held-out DPO loss; the base (loss log 2)
  is a candidate, so a run whose training does not generalise says so and keeps the base. Ties go to the
  earlier stage. ``select: last`` keeps the last round, as the paper does.
- ``early_stop`` ends the loop after a round that is not admissible (later rounds move further from the
  base), or once ``sail.patience`` rounds in a row have not lowered the best held-out loss.
"""

from __future__ import annotations

import math

from ..runs.layout import RunLayout

# The relative drop in prompt consistency that one point of digit accuracy costs when the base loses legibility
# for no preference's sake (lower guidance; bench/round_score_guard.py -> bench/results/round_score_guard.json:
# 3.5% per point, least squares over guidance 7.5 / 4 / 2), fixed before any round of the report was read.
CONSISTENCY_TOLERANCE = 0.035
LOSS = "heldout_dpo_loss"
CONSISTENCY = "prompt_consistency"


def _scored(rows: list[dict]) -> list[dict]:
    return [row for row in rows if isinstance(row.get(LOSS), float) and math.isfinite(row[LOSS])]


def admissible(row: dict, base: dict | None, tolerance: float = CONSISTENCY_TOLERANCE) -> bool:
    """Whether a stage's samples keep their prompt (see the module docstring); True when either side is unknown."""
    ours, theirs = row.get(CONSISTENCY), (base or {}).get(CONSISTENCY)
    if not isinstance(ours, float) or not isinstance(theirs, float) or not theirs > 0:
        return True
    return ours >= (1.0 - tolerance) * theirs


def choose_stage(rows: list[dict], rule: str = "auto", tolerance: float = CONSISTENCY_TOLERANCE) -> dict:
    """The stage ``rule`` keeps from ``metric_rows`` (one per evaluated stage, in the loop's order), with why."""
    if not rows:
        raise ValueError("no stage has been evaluated yet: nothing to choose from")
    last = rows[-1]
    if rule == "last":
        return {"stage": last["stage"], "rule": rule, "reason": "sail.select: last keeps the last stage"}
    base = next((row for row in rows if row["stage"] == RunLayout.BASE), None)
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
    reason = f"lowest held-out DPO loss against the base ({best[LOSS]:.4f}) of the admissible stages"
    if dropped:
        reason += f"; {', '.join(dropped)} lost more than {tolerance:.1%} of the base's prompt consistency"
    return {"stage": best["stage"], "rule": rule, "reason": reason}


def stop_reason(rows: list[dict], patience: int, tolerance: float = CONSISTENCY_TOLERANCE) -> str | None:
    """Why the loop should stop after the last row's round (None: go on)."""
    scored = _scored(rows)
    if not scored or RunLayout.round_of(scored[-1]["stage"]) < 1:
        return None
    last = scored[-1]
    base = next((row for row in rows if row["stage"] == RunLayout.BASE), None)
    if not admissible(last, base, tolerance):
        return (
            f"{last['stage']} kept less than {1 - tolerance:.1%} of the base's prompt consistency "
            f"({last[CONSISTENCY]:.4f} against {base[CONSISTENCY]:.4f})"
        )
    best = min(scored, key=lambda row: row[LOSS])
    since = RunLayout.round_of(last["stage"]) - RunLayout.round_of(best["stage"])
    if since >= patience:
        return f"the held-out DPO loss has not improved on {best['stage']}'s ({best[LOSS]:.4f}) for {since} round(s)"
    return None
