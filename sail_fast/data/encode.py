"""Images to latents, once: resize, crop, flip, VAE-encode and text-encode pair records into
``LatentPairs`` (training then reads only cached latents, which is what makes each round fast).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from ..diffusion.stack import DiffusionStack
from .latent_pairs import LatentPairs
from .records import PairRecord, open_image

FLIPS = ("none", "random", "always")


# ----------------------------------------------------------------------------- encoding


def prepare_image(img: Image.Image, resolution: int, mode: str, flip: bool) -> tuple[np.ndarray, list[int]]:
    """Resize shortest side, centre crop, optionally mirror; returns [C, H, W] in [-1, 1] and SDXL time ids."""
    img = img.convert(mode)
    orig_w, orig_h = img.size
    scale = resolution / min(orig_w, orig_h)
    # max() guards against rounding the short side below the crop size.
    new_w = max(resolution, round(orig_w * scale))
    new_h = max(resolution, round(orig_h * scale))
    if (new_w, new_h) != img.size:
        # PIL's bicubic is antialiased when downscaling (its kernel widens with the scale).
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    # Same rounding as torchvision's CenterCrop, which diffusers' SDXL scripts record.
    top = int(round((new_h - resolution) / 2.0))
    left = int(round((new_w - resolution) / 2.0))
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip:
        img = ImageOps.mirror(img)
        # In the mirrored resized image the kept window starts this far from the left.
        left = new_w - resolution - left
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return arr, [orig_h, orig_w, top, left, resolution, resolution]


def _flip_decisions(n: int, flip: str, seed: int) -> list[bool]:
    if flip == "none":
        return [False] * n
    if flip == "always":
        return [True] * n
    # One draw per pair, in record order, so flips do not depend on batch_size.
    return (torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5).tolist()


def image_seeds(seed: int, n_items: int, per_item: int = 2) -> np.ndarray:
    """Independent seeds [n_items, per_item] (e.g. per pair and side): VAE sampling noise is then
    independent of batching."""
    state = np.random.SeedSequence(seed).generate_state(per_item * n_items, dtype=np.uint64) >> np.uint64(1)
    return state.reshape(n_items, per_item)


def image_mode(stack: DiffusionStack, resolution: int) -> str:
    """The PIL mode images are read in for ``stack`` ("L" or "RGB"), checking ``resolution`` fits its VAE."""
    vae = stack.vae
    channels = vae.config.in_channels if vae is not None else stack.latent_channels
    if channels not in (1, 3):
        where = "the VAE's in_channels" if vae is not None else "a pixel-space UNet's in_channels"
        raise ValueError(f"{where} is {channels}; images can be encoded only as 1 (grayscale) or 3 (RGB) channels")
    if vae is not None and resolution % stack.vae_scale_factor:
        raise ValueError(f"resolution {resolution} must be a multiple of the VAE scale factor {stack.vae_scale_factor}")
    return "L" if channels == 1 else "RGB"


def prompt_table(
    prompts: Sequence[str], stack: DiffusionStack, *, batch_size: int = 16, dtype: torch.dtype = torch.float32
):
    """(unique prompts in first-seen order with "" last, their embeddings [U, L, D], pooled [U, D2] or None)."""
    unique = list(dict.fromkeys(p for p in prompts if p != ""))
    unique.append("")
    chunks = [stack.encode_prompts(unique[i : i + batch_size]) for i in range(0, len(unique), batch_size)]
    embeds = torch.cat([c.prompt_embeds for c in chunks]).to("cpu", dtype)
    pooled = None
    if chunks[0].pooled_prompt_embeds is not None:
        pooled = torch.cat([c.pooled_prompt_embeds for c in chunks]).to("cpu", dtype)
    return unique, embeds, pooled


def encode_pixels(
    pixels: torch.Tensor, stack: DiffusionStack, seeds: Sequence[int], origins: Sequence[str]
) -> torch.Tensor:
    """Pixels [B, C, H, W] in [-1, 1] to float32 CPU latents (scaled; unchanged for a pixel-space stack).

    Each image samples the VAE's latent distribution with its own seed, so the result does not
    depend on how images are batched."""
    vae = stack.vae
    if vae is None:
        return pixels.float()
    param = next(vae.parameters())
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    with torch.no_grad():
        dist = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
        latents = (dist.sample(generator=gens) * vae.config.scaling_factor).float().cpu()
    if not torch.isfinite(latents).all():
        bad = [origins[k] for k in range(len(latents)) if not torch.isfinite(latents[k]).all()]
        raise ValueError(
            f"the VAE produced non-finite latents for {bad}; SDXL's VAE overflows in float16, "
            "so load it in float32 (or use a fp16-fixed VAE)"
        )
    return latents


def encode_pairs(
    records: Sequence[PairRecord],
    stack: DiffusionStack,
    *,
    resolution: int,
    flip: str = "none",
    seed: int = 0,
    batch_size: int = 16,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> LatentPairs:
    """Encode pairs once into LatentPairs (latents, prompt embeddings, SDXL time ids).

    resolution: pixel side fed to the VAE (for a pixel-space stack, the latent side).
        Each image is resized so its shortest side is ``resolution`` (bicubic), centre
        cropped to a square, and its original size and crop recorded for SDXL time ids.
    flip: "none", "random" (mirror a pair with probability 0.5, drawn from a generator
        seeded with ``seed``; winner and loser always share the flip) or "always".
    seed: also seeds the VAE's latent_dist.sample, one generator per image, so the
        result does not depend on ``batch_size``.
    batch_size: pairs per step; winners and losers go through the VAE in separate calls
        of that many images, prompts through the text encoders in chunks of that many.
    dtype: storage dtype of latents and prompt embeddings (time ids and labels are float32).
    """
    records = list(records)
    if not records:
        raise ValueError("encode_pairs needs at least one record")
    if flip not in FLIPS:
        raise ValueError(f"flip must be one of {FLIPS}, got {flip!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    mode = image_mode(stack, resolution)
    for r in records:
        if not 0.0 <= float(r.label) <= 1.0:
            raise ValueError(f"{r.origin or 'record'}: label must be in [0, 1], got {r.label}")

    prompts, prompt_embeds, pooled = prompt_table(
        [r.prompt for r in records], stack, batch_size=batch_size, dtype=dtype
    )
    row_of = {p: i for i, p in enumerate(prompts)}
    flips = _flip_decisions(len(records), flip, seed)
    seeds = image_seeds(seed, len(records))
    win = lose = None
    time_ids = torch.empty(2, len(records), 6, dtype=torch.float32)

    bar = tqdm(total=len(records), desc="encode pairs", unit="pair", disable=not progress)
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        for side, key in enumerate(("win", "lose")):
            arrays = []
            for j, rec in enumerate(chunk):
                img = open_image(getattr(rec, key), rec.origin, key)
                arr, ids = prepare_image(img, resolution, mode, flips[start + j])
                arrays.append(arr)
                time_ids[side, start + j] = torch.tensor(ids, dtype=torch.float32)
            latents = encode_pixels(
                torch.from_numpy(np.stack(arrays)),
                stack,
                seeds[start : start + len(chunk), side],
                [rec.origin for rec in chunk],
            )
            if win is None:
                win = torch.empty(len(records), *latents.shape[1:], dtype=dtype)
                lose = torch.empty_like(win)
            (win if side == 0 else lose)[start : start + len(chunk)] = latents.to(dtype)
        bar.update(len(chunk))
    bar.close()

    return LatentPairs(
        win=win,
        lose=lose,
        prompt_index=torch.tensor([row_of[r.prompt] for r in records], dtype=torch.int64),
        prompts=prompts,
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled,
        time_ids_win=time_ids[0].clone() if stack.is_sdxl else None,
        time_ids_lose=time_ids[1].clone() if stack.is_sdxl else None,
        label=torch.tensor([float(r.label) for r in records], dtype=torch.float32),
        source=[r.source for r in records],
    )
