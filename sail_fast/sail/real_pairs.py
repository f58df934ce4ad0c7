"""RealAlign's pairs in a SAIL run: the real images for every round, encoded once and cached, and each
round's slice of them against losers made for their captions (``realalign``; inpainted subjects: ``inpaint``),
with RealAlign's optional filters: the top-k real images by a metric, and a score margin over the loser."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..data.encode import image_mode
from ..data.latent_pairs import LatentPairs
from ..data.records import open_image
from ..data.sources import fingerprint
from ..diffusion.images import decode_latents, image_grid
from ..diffusion.sampling import generate_candidates, regenerate_region
from ..runs.run_folder import atomic_save_tensors
from ..runs.seeding import ROUND_REAL_LOSERS, ROUND_REAL_MASKS, derive_seed
from .context import RunContext
from .inpaint import PipelineInpainter, latent_masks, mask_source, subject_masks
from .realalign import (
    PER_ROUND_LOSERS,
    captions,
    encode_real,
    read_real_images,
    real_pixels,
    region_masks,
)


@dataclass
class RealSet:
    """Every round's real images as pairs, and (inpaint by the policy) their subject masks on the latent grid."""

    pairs: LatentPairs
    masks: torch.Tensor | None = None


def _filter_metric(ctx: RunContext):
    from ..metrics import load_metric

    name = ctx.sail.real.filter_metric
    return load_metric(name, ctx.sail.real.filter_weights, device=ctx.device, **ctx.world.metric_options(name))


def top_k_real_images(ctx: RunContext, items: list) -> list:
    """RealAlign's curation: the ``sail.real.top_k`` real images the filter metric scores highest, best first."""
    k, metric = ctx.sail.real.top_k, _filter_metric(ctx)
    scores = []
    for start in tqdm(range(0, len(items), 64), desc="score real images", unit="batch", disable=not ctx.progress):
        chunk = items[start : start + 64]
        scores.append(
            metric.score([open_image(it.image, it.origin, "real") for it in chunk], [it.caption for it in chunk])
        )
    order = torch.cat(scores).argsort(descending=True, stable=True)[:k]
    ctx.log(f"RealAlign: kept the top {min(k, len(items))} of {len(items)} real images by {metric.name}")
    return [items[i] for i in order.tolist()]


def encoded_real_images(ctx: RunContext) -> RealSet:
    """Every round's real images, encoded once (with their blurred, noised or pipeline-inpainted losers) and cached."""
    sail = ctx.sail
    real, need = sail.real, sail.real_images_needed()
    loser_kinds = {round_sail.real.loser for round_sail in ctx.round_sails}
    source = ctx.world.real_images(ctx, need)
    items = read_real_images(source)
    available = min(len(items), real.top_k or len(items))
    if available < need:
        raise ValueError(
            f"{source} holds {len(items)} real images"
            + (f" (keeping top_k={real.top_k})" if real.top_k else "")
            + f", but {sail.real_per_round()} real pairs per round"
            + (f" x {sail.rounds} rounds" if real.disjoint else "")
            + f" need {need}; "
            "add images or lower sail.real.per_round" + (" (or sail.rounds)" if real.disjoint else "")
        )
    settings = {
        "model": ctx.model.model_dump(),
        "resolution": ctx.data.resolution,
        "count": need,
        "seed": ctx.seed,
        "loser": real.loser,
        "top_k": real.top_k,
        "filter": real.filter_metric,
    }
    if real.loser in ("blur", "noise"):  # the only losers encoded with the real images
        settings[real.loser] = real.blur_sigma if real.loser == "blur" else real.noise_std
    if "inpaint" in loser_kinds:
        settings |= {
            "mask": real.mask,
            "pipeline": real.inpaint_pipeline,
            "steps": real.inpaint_steps,
            "strength": real.inpaint_strength,
        }
    cache = Path(ctx.data.cache_dir or ctx.layout.cache) / f"real-{fingerprint([Path(source)], settings)}.safetensors"
    masks_file = cache.with_suffix(".masks.safetensors")
    policy_inpaints = "inpaint" in loser_kinds and real.inpaint_pipeline is None
    mask_fn = mask_source(real.mask, ctx.world.subject_masks) if "inpaint" in loser_kinds else None
    if ctx.dist.is_main and not cache.exists():
        if real.top_k is not None:
            items = top_k_real_images(ctx, items)
        ctx.log(f"RealAlign: encoding {need} real images from {source} (loser: {real.loser})")
        redraw = None
        if real.inpaint_pipeline is not None:
            inpainter = PipelineInpainter(
                real.inpaint_pipeline, steps=real.inpaint_steps, strength=real.inpaint_strength, device=ctx.device
            )

            def redraw(pixels, chunk, seeds):
                return inpainter(pixels, subject_masks(mask_fn, chunk, pixels), [it.caption for it in chunk], seeds)

        encoded = encode_real(
            items[:need],
            ctx.stack,
            resolution=ctx.data.resolution,
            loser=real.loser,
            blur_sigma=real.blur_sigma,
            noise_std=real.noise_std,
            seed=ctx.seed,
            batch_size=ctx.data.encode_batch_size,
            redraw=redraw,
            progress=ctx.progress,
        )
        if policy_inpaints:  # written first: the pairs file marks the cache complete
            atomic_save_tensors(
                {"masks": _latent_subject_masks(ctx, items[:need], mask_fn, encoded.win.shape[-2:])}, masks_file
            )
        encoded.save(cache)  # written to a temporary name and renamed
    ctx.dist.barrier()
    return RealSet(LatentPairs.load(cache), load_file(masks_file)["masks"] if policy_inpaints else None)


def _latent_subject_masks(ctx: RunContext, items: list, mask_fn, latent_size) -> torch.Tensor:
    mode, size, out = image_mode(ctx.stack, ctx.data.resolution), ctx.data.encode_batch_size, []
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        pixels, _ = real_pixels(chunk, ctx.data.resolution, mode)
        out.append(latent_masks(subject_masks(mask_fn, chunk, pixels), latent_size))
    return torch.cat(out)


def real_pairs(ctx: RunContext, real_set: RealSet, r: int, policy) -> LatentPairs:
    """This round's slice of the real images, each against its loser (and past the margin filter, if set)."""
    real, per = ctx.sail.real, ctx.sail.real_per_round()
    first = (r - 1) * per if real.disjoint else 0
    positions = list(range(first, first + per))[ctx.dist.rank :: ctx.dist.world_size]
    part = real_set.pairs.subset(positions)
    if real.loser in PER_ROUND_LOSERS and not (real.loser == "inpaint" and real_set.masks is None):
        masks = None if real_set.masks is None else real_set.masks[positions]
        part = dataclasses.replace(part, lose=_losers(ctx, r, part, positions, policy, masks))
    keep = _past_margin(ctx, part) if real.min_margin is not None else torch.ones(len(part), dtype=torch.bool)
    gathered, order = ctx.gather_in_order(part, keep)
    kept = torch.cat([g[1] for g in gathered])[order]
    pairs = LatentPairs.cat([g[0] for g in gathered]).subset(order[kept].tolist())
    if ctx.dist.is_main:
        _grid(ctx, ctx.layout.real_pairs_grid(r), pairs)
    dropped = (
        f"; {int((~kept).sum())} of {len(kept)} dropped by the margin filter" if real.min_margin is not None else ""
    )
    ctx.log(f"round {r}: {len(pairs)} real pairs (RealAlign, loser: {real.loser}{dropped})")
    if not len(pairs):
        raise ValueError(
            f"round {r}: no real pair passed sail.real.min_margin={real.min_margin} "
            f"({real.filter_metric}); lower the margin or unset it"
        )
    return pairs


def _past_margin(ctx: RunContext, part: LatentPairs) -> torch.Tensor:
    """RealAlign's margin filter: score(real) - score(loser) > ``sail.real.min_margin`` under the filter metric."""
    metric, caps, vae = _filter_metric(ctx), captions(part), ctx.stack.vae
    real = metric.score(decode_latents(part.win, vae), caps)
    loser = metric.score(decode_latents(part.lose, vae), caps)
    return (real - loser) > ctx.sail.real.min_margin


def _losers(
    ctx: RunContext, r: int, part: LatentPairs, positions: list[int], policy, masks: torch.Tensor | None
) -> torch.Tensor:
    """The round policy's losers (its own sample, or the real latent with a redrawn region or subject),
    seeded by (seed, round, position) and saved so a resumed round does not redraw them."""
    file = ctx.layout.real_losers(r, ctx.dist.rank)
    if file.exists():
        return load_file(file)["latents"]
    real, sail = ctx.sail.real, ctx.sail
    caps = captions(part)
    seeds = torch.tensor([derive_seed(ctx.seed, ROUND_REAL_LOSERS + r, p) for p in positions], dtype=torch.int64)
    stack = ctx.stack_with(policy)
    height, width = part.win.shape[-2:]
    sampling = real.sampling(ctx.sampling)
    if real.loser == "own_sample":
        latents = generate_candidates(
            stack,
            caps,
            1,
            seeds=seeds.view(-1, 1),
            height=height,
            width=width,
            batch_size=sail.generation_batch,
            progress=ctx.progress,
            **sampling,
        ).latents[:, 0]
    elif real.loser == "inpaint":
        latents = regenerate_region(
            stack,
            part.win,
            caps,
            masks,
            strength=real.inpaint_strength,
            seeds=seeds,
            batch_size=sail.generation_batch,
            progress=ctx.progress,
            **sampling,
        )
    else:
        masks = region_masks(
            height, width, real.mask_fraction, [derive_seed(ctx.seed, ROUND_REAL_MASKS + r, p) for p in positions]
        )
        latents = regenerate_region(
            stack,
            part.win,
            caps,
            masks,
            strength=real.renoise_strength,
            seeds=seeds,
            batch_size=sail.generation_batch,
            progress=ctx.progress,
            **sampling,
        )
    atomic_save_tensors({"latents": latents}, file)
    return latents


def _grid(ctx: RunContext, path: Path, pairs: LatentPairs) -> None:
    rows = min(ctx.sail.grid_prompts, len(pairs))
    images = ctx.pictures(torch.stack([pairs.win[:rows], pairs.lose[:rows]], dim=1).flatten(0, 1).float())
    if images is not None:
        loser = {"own_sample": "sample", "masked_renoise": "redrawn", "inpaint": "inpainted"}.get(
            ctx.sail.real.loser, ctx.sail.real.loser
        )
        image_grid(images, columns=2, captions=["real", loser] * rows).save(path)
