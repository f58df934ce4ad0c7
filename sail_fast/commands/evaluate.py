"""``sail-fast eval``: sample checkpoints on a prompt set with one fixed sampler, CFG and seed (explicit,
else the first checkpoint's run settings, else the paper's), score
the pictures with local-weights metrics, and write eval.json and eval.md (per-group means for
HPSv2 styles and PartiPrompts categories, per-prompt win rates of each checkpoint against the
first).

Every checkpoint sees the same initial noise for prompt p, image n, so two checkpoints differ
only by their weights. A checkpoint's per-image scores go to ``scores/<label>.json`` when it is
done; a rerun with the same settings reuses them, so an interrupted evaluation resumes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..diffusion.images import enlarge, image_grid
from ..diffusion.prompts import PromptSet
from ..diffusion.sampling import candidate_seeds
from ..metrics import METRICS, Metric, load_metric
from ..runs.output_folder import OutputFolder
from ..runs.readback import read_json_file
from .generate import (
    check_checkpoint,
    check_picturable,
    resolve_checkpoint,
    sample_pictures,
    sampling_settings,
)

GRID_PROMPTS = 8


def checkpoint_labels(checkpoints: list[str | Path]) -> list[str]:
    """Short unique labels: the directory name, or parent/name where names repeat."""
    labels = [Path(c).name or str(c) for c in checkpoints]
    if len(set(labels)) < len(labels):
        labels = [f"{Path(c).parent.name}/{Path(c).name}" for c in checkpoints]
    if len(set(labels)) < len(labels):
        labels = [f"{i}:{label}" for i, label in enumerate(labels)]
    return labels


def mean_and_sem(values: torch.Tensor) -> dict[str, float]:
    """Mean and standard error over prompts of the per-prompt means (images of one prompt are not independent).
    NaN scores (non-finite pictures, never scored) are left out and counted."""
    values = values.double()
    per_prompt = values.nanmean(dim=1)
    per_prompt = per_prompt[~per_prompt.isnan()]
    sem = per_prompt.std().item() / math.sqrt(len(per_prompt)) if len(per_prompt) > 1 else 0.0
    mean = per_prompt.mean().item() if len(per_prompt) else float("nan")
    return {"mean": mean, "sem": sem, "prompts": len(per_prompt), "non_finite_images": int(values.isnan().sum())}


def summarize(scores: torch.Tensor, groups: list[str] | None) -> dict:
    """Scores [P, n] to the overall mean and sem, and each group's (in first-seen order)."""
    summary = mean_and_sem(scores)
    if groups is not None:
        order = list(dict.fromkeys(groups))
        summary["groups"] = {g: mean_and_sem(scores[[i for i, x in enumerate(groups) if x == g]]) for g in order}
    return summary


def win_rate(challenger: torch.Tensor, baseline: torch.Tensor) -> dict[str, float]:
    """Per prompt, compare the mean score over its images: wins, ties and losses of ``challenger``,
    and win_rate = (wins + ties / 2) / prompts."""
    a, b = challenger.double().nanmean(dim=1), baseline.double().nanmean(dim=1)
    both = ~(a.isnan() | b.isnan())  # a prompt with no finite picture on either side is not compared
    a, b = a[both], b[both]
    wins, ties = int((a > b).sum()), int((a == b).sum())
    rate = (wins + ties / 2) / len(a) if len(a) else float("nan")
    return {"wins": wins, "ties": ties, "losses": len(a) - wins - ties, "win_rate": rate}


def score_checkpoint(
    checkpoint,
    prompt_set: PromptSet,
    metrics: dict[str, Metric],
    *,
    images_per_prompt: int,
    seed: int,
    sampler=None,
    steps=None,
    guidance_scale=None,
    sampling: dict | None = None,
    batch_size: int = 16,
    image_file=None,
) -> tuple[dict[str, torch.Tensor], dict, list]:
    """Per-image scores {metric: [P, n]}, the sampling settings used, and the first prompts' pictures. Prompts go in chunks of
    ``batch_size`` (sample, decode, score, drop) so a large set never holds all its pictures. ``image_file``: where
    each picture is saved (a PNG name to its path), or None."""
    stack, run_sampling = resolve_checkpoint(checkpoint)
    check_picturable(stack, checkpoint)
    if sampling is None:  # the first checkpoint fixes the settings for every later one
        sampling = sampling_settings(stack, run_sampling, sampler, steps, guidance_scale)
    prompts, n = prompt_set.prompts, images_per_prompt
    seeds = candidate_seeds(seed, len(prompts), n)
    scores = {name: [] for name in metrics}
    shown = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=f"eval {Path(checkpoint).name}", unit="chunk"):
        chunk = prompts[start : start + batch_size]
        pictures, finite = sample_pictures(
            stack,
            chunk,
            n,
            sampling,
            seeds=seeds[start : start + len(chunk)],
            batch_size=batch_size * n,
            progress=False,
        )
        per_image_prompts = [p for p in chunk for _ in range(n)]
        for name, metric in metrics.items():
            # A non-finite picture is reported (NaN, counted in eval.json), never scored as the black image it decodes to.
            scored = metric.score(pictures, per_image_prompts).float().masked_fill(~finite, float("nan"))
            scores[name].append(scored.view(len(chunk), n))
        if image_file is not None:
            for i, picture in enumerate(pictures):
                with image_file(f"{start + i // n:04d}-{i % n:02d}.png") as tmp:  # a path to write, then moved in place
                    picture.save(tmp)
        if len(shown) < GRID_PROMPTS * n:
            shown += pictures[: GRID_PROMPTS * n - len(shown)]
    return {name: torch.cat(parts) for name, parts in scores.items()}, sampling, shown


def load_metrics(
    names: list[str], weights_dir: str | Path | None = None, weights: dict[str, str] | None = None, **kw
) -> dict[str, Metric]:
    """Each metric from ``weights[name]``, else ``weights_dir/name`` when that exists, else its shipped default."""
    weights = dict(weights or {})
    unknown = [n for n in [*names, *weights] if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
    loaded = {}
    for name in names:
        path = weights.get(name)
        if path is None and weights_dir is not None and (Path(weights_dir) / name).exists():
            path = Path(weights_dir) / name
        loaded[name] = load_metric(name, path, **kw)
    return loaded


SCORES_KEYS = ("checkpoint", "settings", "sampling", "scores")


def read_scores(file: Path) -> dict:
    """A checkpoint's stored scores (``scores/<label>.json``); a damaged or edited one is named, with its fix."""
    record = read_json_file(file, "delete it to score that checkpoint again")
    missing = [k for k in SCORES_KEYS if k not in record] if isinstance(record, dict) else list(SCORES_KEYS)
    if missing:
        raise ValueError(
            f"{file}: a scores file needs the keys {', '.join(SCORES_KEYS)}, missing {', '.join(missing)}; "
            "delete it to score that checkpoint again"
        )
    return record


def _settings(
    prompt_set: PromptSet, metrics: dict[str, Metric], images_per_prompt: int, seed: int, sampling_args: dict
):
    """What a checkpoint's stored scores depend on, besides its weights: reuse them only when this matches."""
    return {
        "prompt_set": prompt_set.name,
        "prompts": prompt_set.prompts,
        "metrics": {k: m.describe() for k, m in metrics.items()},
        "images_per_prompt": images_per_prompt,
        "seed": seed,
        "requested_sampling": sampling_args,
    }


def evaluate(
    checkpoints: list[str | Path],
    prompt_set: PromptSet,
    metrics: dict[str, Metric],
    out_dir: str | Path,
    *,
    images_per_prompt: int = 1,
    seed: int = 0,
    sampler=None,
    steps=None,
    guidance_scale=None,
    batch_size: int = 16,
    save_images: bool = False,
) -> dict:
    """Score every checkpoint and write eval.json, eval.md and a sample grid per checkpoint."""
    if not checkpoints:
        raise ValueError("give at least one --checkpoint")
    if images_per_prompt < 1:
        raise ValueError(f"--images-per-prompt must be >= 1, got {images_per_prompt}")
    for checkpoint in checkpoints:  # a damaged or unrecorded checkpoint is refused before any is sampled
        check_checkpoint(checkpoint)
    out = OutputFolder(out_dir, "eval")
    labels = checkpoint_labels(checkpoints)
    sampling_args = {"sampler": sampler, "num_inference_steps": steps, "guidance_scale": guidance_scale}
    settings = _settings(prompt_set, metrics, images_per_prompt, seed, sampling_args)
    files = [out.path / f"scores/{label.replace('/', '__').replace(':', '_')}.json" for label in labels]
    # Every stored score is read before any sampling too; only files this command wrote are read.
    records = [read_scores(f) if f.relative_to(out.path).as_posix() in out.files else None for f in files]
    per_image, sampling_used = {}, {}
    fixed = None  # the sampling settings, resolved on the first checkpoint and kept for all
    for label, checkpoint, file, record in zip(labels, checkpoints, files, records):
        scores_name = file.relative_to(out.path).as_posix()
        if (
            record is not None
            and record["settings"] == settings
            and record["checkpoint"] == str(checkpoint)
            and record["sampling"] == (fixed or record["sampling"])
        ):
            per_image[label] = {k: torch.tensor(v) for k, v in record["scores"].items()}
            sampling_used[label] = fixed = record["sampling"]
            continue
        image_file = (lambda name, stem=file.stem: out.write(f"images/{stem}/{name}")) if save_images else None
        scores, sampling, grid = score_checkpoint(
            checkpoint,
            prompt_set,
            metrics,
            images_per_prompt=images_per_prompt,
            seed=seed,
            sampler=sampler,
            steps=steps,
            guidance_scale=guidance_scale,
            sampling=fixed,
            batch_size=batch_size,
            image_file=image_file,
        )
        fixed = sampling
        shown = [f"{prompt_set.prompts[i // images_per_prompt][:40]} | {label}" for i in range(len(grid))]
        with out.write(f"samples-{file.stem}.png") as tmp:
            image_grid(enlarge(grid), columns=images_per_prompt, captions=shown).save(tmp)
        per_image[label], sampling_used[label] = scores, sampling
        out.write_text(
            scores_name,
            json.dumps(
                {
                    "checkpoint": str(checkpoint),
                    "settings": settings,
                    "sampling": sampling,
                    "scores": {k: v.tolist() for k, v in scores.items()},
                }
            )
            + "\n",
        )

    result = {
        "prompt_set": {
            "name": prompt_set.name,
            "prompts": len(prompt_set.prompts),
            "groups": list(dict.fromkeys(prompt_set.groups)) if prompt_set.groups else None,
        },
        "images_per_prompt": images_per_prompt,
        "seed": seed,
        "metrics": {name: metric.describe() for name, metric in metrics.items()},
        "checkpoints": [
            {
                "label": label,
                "path": str(c),
                "sampling": sampling_used[label],
                "scores": {m: summarize(s, prompt_set.groups) for m, s in per_image[label].items()},
            }
            for label, c in zip(labels, checkpoints)
        ],
        "win_rates": {
            f"{label} vs {labels[0]}": {m: win_rate(per_image[label][m], per_image[labels[0]][m]) for m in metrics}
            for label in labels[1:]
        },
    }
    out.write_text("eval.json", json.dumps(result, indent=2) + "\n")
    out.write_text("eval.md", markdown_report(result))
    return result


def markdown_report(result: dict) -> str:
    metrics = list(result["metrics"])
    ps = result["prompt_set"]
    first = result["checkpoints"][0]["sampling"]
    lines = [
        f"# Evaluation on {ps['name']} ({ps['prompts']} prompts x {result['images_per_prompt']} images, seed "
        f"{result['seed']}, {first['sampler']} {first['num_inference_steps']} steps, CFG {first['guidance_scale']})",
        "",
    ]
    lines += ["Metrics: " + "; ".join(f"{m} = {d['version']}" for m, d in result["metrics"].items()), ""]
    lines += ["| checkpoint | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for ck in result["checkpoints"]:
        cells = [f"{ck['scores'][m]['mean']:.4f} ± {ck['scores'][m]['sem']:.4f}" for m in metrics]
        lines.append(f"| {ck['label']} | " + " | ".join(cells) + " |")
    for ck in result["checkpoints"]:
        bad = max(ck["scores"][m].get("non_finite_images", 0) for m in metrics)
        if bad:
            lines += [
                "",
                f"**{ck['label']}: {bad} pictures hold NaN or inf**; they are left out of its scores "
                "(and drawn as a red NaN marker).",
            ]
    if ps["groups"]:
        for m in metrics:
            lines += [
                "",
                f"## {m} by group",
                "",
                "| checkpoint | " + " | ".join(ps["groups"]) + " | mean |",
                "|---|" + "---|" * (len(ps["groups"]) + 1),
            ]
            for ck in result["checkpoints"]:
                s = ck["scores"][m]
                lines.append(
                    f"| {ck['label']} | "
                    + " | ".join(f"{s['groups'][g]['mean']:.4f}" for g in ps["groups"])
                    + f" | {s['mean']:.4f} |"
                )
    if result["win_rates"]:
        lines += [
            "",
            "## Per-prompt win rates (ties count half)",
            "",
            "| comparison | " + " | ".join(metrics) + " |",
            "|---|" + "---|" * len(metrics),
        ]
        for name, rates in result["win_rates"].items():
            cells = [f"{r['win_rate']:.3f} ({r['wins']}/{r['ties']}/{r['losses']})" for r in rates.values()]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "Cells: win rate (wins/ties/losses over prompts)."]
    return "\n".join(lines) + "\n"
