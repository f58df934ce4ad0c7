"""What a finished SAIL run shows a person: a small table of its stages and a side-by-side picture.

Both read the per-sample evaluation files (``eval_samples.safetensors``) that the loop writes for
the toy world: every stage was sampled on the same prompts with the same seeds, so the table's
differences are paired and the picture compares like with like.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw
from safetensors.torch import load_file

from ..diffusion.images import decode_latents, enlarge
from ..runs.layout import RunLayout

# The stage's self-label quality on its own evaluation samples (sail_fast.sail.label_quality): columns and keys.
LABEL_COLUMNS = (
    ("held-out agreement", "self_label_agreement"),
    ("label accuracy", "label_accuracy"),
    ("gap share", "label_gap_share"),
    ("ρ(reward, human)", "reward_human_spearman"),
    ("ρ(reward, width)", "reward_width_spearman"),
    ("ρ(reward, log p)", "reward_log_prob_spearman"),
)


def stage_table(rows: list[dict]) -> str:
    """Markdown: per stage, the human score, its paired change from the base (± prompt-clustered SE),
    digit accuracy, haze, and how well the stage's implicit reward ranks its own samples by the noiseless
    human (a diagnostic; the method never sees it). ``rows`` are the loop's metric rows (eval.json plus
    the stage name)."""
    head = ["stage", "score", "score - base (paired ± SE)", "digit accuracy", "haze", *(c for c, _ in LABEL_COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if "oracle_score" not in row:
            continue
        change = row.get("vs_base", {}).get("score")
        cell = "-" if change is None else f"{change[0]:+.3f} ± {change[1]:.3f}"
        labels = " | ".join("-" if row.get(key) is None else f"{row[key]:.3f}" for _, key in LABEL_COLUMNS)
        lines.append(
            f"| {row['stage']} | {row['oracle_score']:.3f} | {cell} | {row['digit_accuracy']:.3f} "
            f"| {row.get('haze', float('nan')):.4f} | {labels} |"
        )
    return "\n".join(lines)


def compare_picture(
    base_samples: Path, final_samples: Path, prompts: list[str], path: Path, *, per_prompt: int = 4, rows: int = 10
) -> Path:
    """``path``: for ``rows`` prompts (one per digit first), ``per_prompt`` samples of the base beside
    the same seeds drawn by the final model, each row labelled with its prompt."""
    from .world import digit_of

    base = load_file(base_samples)["latents"]
    final = load_file(final_samples)["latents"]
    first_of_digit = list(dict.fromkeys(digit_of(p) for p in prompts))
    chosen = [next(i for i, p in enumerate(prompts) if digit_of(p) == d) for d in first_of_digit][:rows]
    n = min(per_prompt, base.shape[1])
    tiles = [enlarge(decode_latents(x[chosen, :n].flatten(0, 1).clamp(-1, 1)), min_side=64) for x in (base, final)]
    side = tiles[0][0].width
    label_w, gap, head = 190, 16, 18
    width = label_w + 2 * n * side + gap
    picture = Image.new("RGB", (width, head + len(chosen) * (side + 4)), "white")
    draw = ImageDraw.Draw(picture)
    draw.text((label_w, 3), "base model", fill="black")
    draw.text((label_w + n * side + gap, 3), f"final model ({final_samples.parent.name}), same seeds", fill="black")
    for r, i in enumerate(chosen):
        y = head + r * (side + 4)
        draw.text((4, y + side // 2 - 6), prompts[i][:30], fill="black")
        for k in range(n):
            picture.paste(tiles[0][r * n + k].convert("RGB"), (label_w + k * side, y))
            picture.paste(tiles[1][r * n + k].convert("RGB"), (label_w + n * side + gap + k * side, y))
    picture.save(path)
    return path


def report(layout: RunLayout, rows: list[dict], final_stage: str, prompts: list[str]) -> str:
    """The table as text (the loop writes it into summary.md), and compare.png when the base and the final stage
    both have samples."""
    table = stage_table(rows)
    if layout.eval_samples(RunLayout.BASE).exists() and layout.eval_samples(final_stage).exists():
        compare_picture(layout.eval_samples(RunLayout.BASE), layout.eval_samples(final_stage), prompts, layout.compare)
    return table
