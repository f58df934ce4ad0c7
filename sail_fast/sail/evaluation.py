"""Each stage's evaluation: fixed-seed samples on the world's evaluation prompts, diversity, self-label
agreement on held-out human pairs, and (where the world has a judge) per-sample scores, paired against
the base and iter0 (same prompts, same seeds), written as ``<stage>/eval.json`` and ``eval_samples``;
then ``metrics.json`` and ``curves.png`` over the stages."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..data.latent_pairs import LatentPairs
from ..diffusion.images import image_grid
from ..diffusion.sampling import generate_candidates
from ..metrics.statistics import paired_difference
from ..runs.layout import RunLayout
from ..runs.run_folder import atomic_save_tensors, read_json, write_json
from ..runs.seeding import EVAL_AGREEMENT_DRAWS, EVAL_SAMPLE_SEEDS, derive_seed
from .context import RunContext
from .label_quality import eval_label_quality
from .ranking import implicit_scorer
from .round_score import heldout_fit, prompt_consistency


def sample_diversity(latents: torch.Tensor) -> float:
    """Mean RMS distance between two samples of the same prompt, for latents [P, n, ...]."""
    flat = latents.flatten(2).float()
    n = flat.shape[1]
    if n < 2:
        return float("nan")
    dist = torch.cdist(flat, flat) / math.sqrt(flat.shape[-1])  # [P, n, n]
    return float(dist.sum(dim=(1, 2)).mean() / (n * (n - 1)))


@torch.no_grad()
def evaluate_stage(ctx: RunContext, name: str, unet, heldout: LatentPairs | None) -> dict:
    """A stage's metrics: fixed-seed samples on the eval prompts, self-label agreement, the world's judgment."""
    path = ctx.layout.eval_json(name)
    if path.exists():
        return read_json(path)
    prompts = ctx.world.eval_prompts()
    n = ctx.sail.eval_images_per_prompt
    # The same seeds at every stage, so stages differ only by their weights.
    latents = generate_candidates(
        ctx.stack_with(unet),
        prompts,
        n,
        seed=derive_seed(ctx.seed, EVAL_SAMPLE_SEEDS),
        batch_size=ctx.sail.generation_batch,
        progress=ctx.progress,
        **ctx.sampling,
    ).latents
    metrics = {"stage": name, "diversity": sample_diversity(latents)} | stage_score(
        ctx, unet, heldout, latents, prompts
    )
    samples = ctx.world.judge(latents, prompts)  # the world's own judge, if it has one (the toy's human)
    if unet is not ctx.base and (heldout is not None or samples is not None):
        scorer = implicit_scorer(ctx.sail, ctx.beta, ctx.stack.scheduler, unet, ctx.base)
        if heldout is not None:
            metrics["self_label_agreement"] = scorer.pair_accuracy(
                heldout, generator=torch.Generator().manual_seed(derive_seed(ctx.seed, EVAL_AGREEMENT_DRAWS))
            )
        if samples is not None and ctx.sail.eval_label_quality:  # how well the stage's reward ranks its samples
            metrics |= eval_label_quality(ctx, scorer, latents, prompts, samples)
    if samples is not None:
        metrics |= ctx.world.summary(samples, prompts) | paired_with_earlier(ctx.layout, name, samples)
    if ctx.dist.is_main:
        images = ctx.pictures(latents[: min(10, len(prompts))].flatten(0, 1))
        path.parent.mkdir(parents=True, exist_ok=True)
        if images is not None:
            shown = [f"{prompts[i // n]} ({name})" for i in range(len(images))]
            image_grid(images, columns=n, captions=shown).save(ctx.layout.samples_grid(name))
        if samples is not None:  # per-sample tables: later stages pair their scores with these
            atomic_save_tensors({"latents": latents} | samples, ctx.layout.eval_samples(name))
        write_json(path, metrics)
    ctx.dist.barrier()
    shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
    ctx.log(f"{name}: {shown}")
    return metrics


def stage_score(ctx: RunContext, unet, heldout: LatentPairs | None, latents: torch.Tensor, prompts: list[str]) -> dict:
    """The round score (``round_score``): the held-out pairs' fit against the base, and the samples' prompt
    consistency under the base. Never the world's judge."""
    score = prompt_consistency(ctx.stack, ctx.base, latents, prompts, seed=ctx.seed, batch=ctx.sail.scoring_batch)
    if heldout is not None:
        options = {"beta": ctx.beta, "seed": ctx.seed, "micro_batch": ctx.sail.scoring_batch}
        score |= heldout_fit(unet, ctx.base, ctx.stack.scheduler, heldout, **options)
    return score


def paired_with_earlier(layout: RunLayout, name: str, samples: dict[str, torch.Tensor]) -> dict:
    """Paired differences (mean, prompt-clustered SE) of every term against the base and iter0,
    which were sampled on the same prompts with the same seeds."""
    paired = {}
    for other in (RunLayout.BASE, RunLayout.ITER0):
        file = layout.eval_samples(other)
        if other == name or not file.exists():
            continue
        theirs = load_file(file)
        paired[f"vs_{other}"] = {k: paired_difference(samples[k], theirs[k]) for k in samples}
    return paired


def metric_rows(layout: RunLayout, rounds: int) -> list[dict]:
    rows = []
    for i, name in enumerate(RunLayout.stage_names(rounds)):
        file = layout.eval_json(name)
        if not file.exists():
            continue  # not finished, or not evaluated (sail.eval_each_round: false)
        row = {"stage": name, "round": i - 1} | read_json(file)
        ranking = layout.ranking(i - 1) if i > 1 else None
        if ranking is not None and ranking.exists():
            info = read_json(ranking)
            row |= {k: info[k] for k in ("reward_spread_mean", "reward_std_within_prompt")}
            row |= {f"ranking_{k}": v for k, v in info.get("label_quality", {}).items()}  # the round's candidates
            row["candidate_diversity"] = info["diversity"]
        rows.append(row)
    return rows


def write_metrics(layout: RunLayout, rounds: int) -> None:
    """``metrics.json`` (one row per evaluated stage) and ``curves.png``."""
    rows = metric_rows(layout, rounds)
    write_json(layout.metrics, rows)
    plot_curves(rows, layout.curves)


def plot_curves(rows: list[dict], path: Path) -> None:
    """One panel per metric against the stage (base, iter0, round 1, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        k
        for k in ("oracle_score", "digit_accuracy", "self_label_agreement", "diversity", "reward_spread_mean")
        if any(k in row for row in rows)
    ]
    if not rows or not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        xs = [row["round"] for row in rows if key in row]
        ax.plot(xs, [row[key] for row in rows if key in row], marker="o")
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("round (-1 = base, 0 = iter0)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
