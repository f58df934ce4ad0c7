"""RealAlign's pairs in a SAIL run: the real images for every round, encoded once and cached, and each
round's slice of them against losers made for their captions (``realalign``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..data.latent_pairs import LatentPairs
from ..data.sources import fingerprint
from ..images import image_grid
from ..rundir import atomic_save_tensors
from ..sampling import generate_candidates, regenerate_region
from ..seeding import derive_seed
from .context import RunContext
from .realalign import (
    PER_ROUND_LOSERS,
    captions,
    encode_real,
    read_real_images,
    region_masks,
)


def encoded_real_images(ctx: RunContext) -> LatentPairs:
    """Every round's real images, encoded once (with their blurred or noised losers) and cached."""
    sail, config = ctx.sail, ctx.config
    real, need = sail.real, sail.rounds * sail.real_per_round()
    source = ctx.world.real_images(ctx, need)
    items = read_real_images(source)
    if len(items) < need:
        raise ValueError(f"{source} holds {len(items)} real images, but {sail.rounds} rounds x "
                         f"{sail.real_per_round()} real pairs per round need {need}; add images or lower "
                         "sail.real.per_round (or sail.rounds)")
    settings = {"model": config.model.model_dump(), "resolution": config.data.resolution, "count": need,
                "seed": config.seed, "loser": real.loser}
    if real.loser in ("blur", "noise"):  # the only losers encoded with the real images
        settings[real.loser] = real.blur_sigma if real.loser == "blur" else real.noise_std
    cache = Path(config.data.cache_dir or ctx.out / "cache") / f"real-{fingerprint([Path(source)], settings)}.safetensors"
    if ctx.dist.is_main and not cache.exists():
        ctx.log(f"RealAlign: encoding {need} real images from {source} (loser: {real.loser})")
        encoded = encode_real(items[:need], ctx.stack, resolution=config.data.resolution, loser=real.loser,
                              blur_sigma=real.blur_sigma, noise_std=real.noise_std, seed=config.seed,
                              batch_size=config.data.encode_batch_size, progress=ctx.progress)
        encoded.save(cache)  # written to a temporary name and renamed
    ctx.dist.barrier()
    return LatentPairs.load(cache)


def real_pairs(ctx: RunContext, real_set: LatentPairs, stage: Path, r: int, policy) -> LatentPairs:
    """This round's slice of the real images, each against its loser."""
    per = ctx.sail.real_per_round()
    positions = list(range((r - 1) * per, r * per))[ctx.dist.rank :: ctx.dist.world_size]
    part = real_set.subset(positions)
    if ctx.sail.real.loser in PER_ROUND_LOSERS:
        part = dataclasses.replace(part, lose=_losers(ctx, stage, r, part, positions, policy))
    gathered, order = ctx.gather_in_order(part)
    pairs = LatentPairs.cat([g[0] for g in gathered]).subset(order)
    if ctx.dist.is_main:
        _grid(ctx, stage / "real_pairs.png", pairs)
    ctx.log(f"round {r}: {len(pairs)} real pairs (RealAlign, loser: {ctx.sail.real.loser})")
    return pairs


def _losers(ctx: RunContext, stage: Path, r: int, part: LatentPairs, positions: list[int], policy) -> torch.Tensor:
    """The round policy's losers (its own sample, or the real latent with a redrawn region), seeded by
    (seed, round, position) and saved so a resumed round does not redraw them."""
    file = stage / f"real_losers.rank{ctx.dist.rank}.safetensors"
    if file.exists():
        return load_file(file)["latents"]
    real, sail = ctx.sail.real, ctx.sail
    caps = captions(part)
    seeds = torch.tensor([derive_seed(ctx.seed, 8400 + r, p) for p in positions], dtype=torch.int64)
    stack = ctx.stack_with(policy)
    height, width = part.win.shape[-2:]
    if real.loser == "own_sample":
        latents = generate_candidates(stack, caps, 1, seeds=seeds.view(-1, 1), height=height, width=width,
                                      batch_size=sail.generation_batch, progress=ctx.progress, **ctx.sampling).latents[:, 0]
    else:
        masks = region_masks(height, width, real.mask_fraction, [derive_seed(ctx.seed, 8500 + r, p) for p in positions])
        latents = regenerate_region(stack, part.win, caps, masks, strength=real.renoise_strength, seeds=seeds,
                                    batch_size=sail.generation_batch, progress=ctx.progress, **ctx.sampling)
    atomic_save_tensors({"latents": latents}, file)
    return latents


def _grid(ctx: RunContext, path: Path, pairs: LatentPairs) -> None:
    rows = min(ctx.sail.grid_prompts, len(pairs))
    images = ctx.pictures(torch.stack([pairs.win[:rows], pairs.lose[:rows]], dim=1).flatten(0, 1).float())
    if images is not None:
        loser = {"own_sample": "sample", "masked_renoise": "redrawn"}.get(ctx.sail.real.loser, ctx.sail.real.loser)
        image_grid(images, columns=2, captions=["real", loser] * rows).save(path)
