"""summary.md: the round score of every evaluated stage (``round_score``), the stage the run keeps and why
(``selection``), then whatever the world adds (the toy's judged table, stage by stage in the same order)."""

from __future__ import annotations

COLUMNS = (  # (heading, metric key, format): what a run sees of each stage, no judge involved
    ("held-out DPO loss", "heldout_dpo_loss", ".4f"),
    ("held-out accuracy", "heldout_accuracy", ".3f"),
    ("drift", "heldout_drift", "+.4f"),
    ("prompt consistency", "prompt_consistency", ".4f"),
    ("prompt choice", "prompt_choice_accuracy", ".3f"),
    ("pair margin", "reward_spread_mean", ".3f"),
)


def score_table(rows: list[dict], kept: str | None = None) -> str:
    """Markdown: one line per stage with its round score; ``kept`` is marked."""
    head = ["stage", *(c for c, _, _ in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"**{row['stage']}** (kept)" if row["stage"] == kept else row["stage"]]
        cells += ["-" if not isinstance(row.get(k), float) else format(row[k], f) for _, k, f in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_text(rows: list[dict], chosen: dict, world_text: str = "") -> str:
    stopped = (
        f"Stopped early after {chosen['rounds_run']} rounds: {chosen['early_stop']}.\n\n"
        if chosen.get("early_stop")
        else ""
    )
    parts = [
        "## Round score (what the run sees; sail.select and sail.early_stop read it)\n",
        score_table(rows, chosen["stage"]) + "\n",
        f"Kept: **{chosen['stage']}** by sail.select: {chosen['rule']} ({chosen['reason']}).\n",
        stopped.rstrip("\n") + ("\n" if stopped else ""),
    ]
    if world_text:
        parts += ["## Judged by the world (never read by the run)\n", world_text + "\n"]
    return "\n".join(p for p in parts if p)
