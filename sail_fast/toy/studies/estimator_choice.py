"""Choosing the implicit reward's estimator without the oracle: the rule, written before it first ran,
and the rule applied to a policy's audited estimators (``sail-fast toy reward-audit`` reports both)."""

from __future__ import annotations

import math

SELECTION_RULE = """## Choosing the estimator without the oracle (written before it runs)

A real run has no noiseless human; it has the held-out human seed pairs (labelled, never trained on),
its own draws and its compute budget. The rule uses those alone:

1. For every estimator (mean, standardised, ref_normalised, rank), t band (uniform, [0, 250)) and
   K in {6, 10}: its agreement with the held-out human pairs on the iter0 policy, and its test-retest
   correlation (two disjoint draw sets) on the policy's own candidates.
2. Keep the settings whose held-out agreement is within one standard error of the best one.
3. Among those, take the highest test-retest; where two are within 0.02, the cheaper (smaller K);
   then the plainer (mean before the others, uniform before a band).

The oracle diagnostics (accuracy, gap share and Spearman against the noiseless human, correlations
with ink and legibility) are reported for every setting, not only the chosen one, and play no part
in the choice."""

RULE_KS = (6, 10)  # the K the rule compares
# Step 3's "plainer": mean first, then the others in the order step 1 lists them. The rule as first run
# left standardised, ref_normalised and rank tied at K=10; this reading of it breaks the tie.
PLAINNESS = ("mean", "standardised", "ref_normalised", "rank")


def apply_selection_rule(estimators: list[dict], ks=RULE_KS, retest_tie: float = 0.02) -> dict:
    """The rule above on one policy's estimator rows (those with held-out agreement): the rows step 2 keeps,
    the ones step 3 finds tied on test-retest, and the chosen one (None without held-out pairs)."""
    rows = [e for e in estimators if e["k"] in ks and math.isfinite(e.get("heldout", float("nan")))]
    if not rows:
        return {"kept": [], "tied": [], "chosen": None}
    best = max(rows, key=lambda e: e["heldout"])
    kept = [e for e in rows if e["heldout"] >= best["heldout"] - best["heldout_se"]]
    retested = [e for e in kept if math.isfinite(e["retest"])] or kept
    top = max(e["retest"] for e in retested)
    tied = [e for e in retested if not e["retest"] < top - retest_tie]
    chosen = min(tied, key=lambda e: (e["k"], PLAINNESS.index(e["estimator"]), e["band"] != [0, 1000]))
    return {"kept": kept, "tied": tied, "chosen": chosen}


def setting_name(e: dict) -> str:
    return f"{e['estimator']}, t in [{e['band'][0]}, {e['band'][1]}), K={e['k']}"
