"""RealAlign: real images with captions as the preference signal.

Each real image wins against a loser made for its caption, one of

- ``own_sample``: the current policy's own sample for the caption (drawn each round);
- ``blur``: the real image under a Gaussian blur (``blur_sigma`` pixels at the training resolution);
- ``noise``: the real image plus Gaussian pixel noise (``noise_std``, pixels in [-1, 1]);
- ``masked_renoise``: the real latent with a random rectangle (``mask_fraction`` of the area)
  re-noised to ``renoise_strength`` and redrawn by the current policy, the rest kept (each round);
- ``inpaint``: RealAlign's own loser: the salient subject under a soft mask redrawn for the caption, by
  the current policy (each round) or a diffusers inpainting pipeline (once) (``inpaint``).

Real images come from a folder (``metadata.jsonl`` with ``file_name`` and ``text``/``caption``/``prompt``,
or a ``.txt`` caption beside each image) or from parquet (an image column and a caption column).
They are encoded once; blurred and noised losers are encoded with them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, get_args

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.encode import (
    encode_pixels,
    image_mode,
    image_seeds,
    prepare_image,
    prompt_table,
)
from ..data.latent_pairs import LatentPairs
from ..data.records import ImageSource, open_image
from ..diffusion.stack import DiffusionStack
from ..runs.config import RealLoser

REAL_LOSERS = get_args(RealLoser)
PER_ROUND_LOSERS = (
    "own_sample",
    "masked_renoise",
    "inpaint",
)  # drawn by the round's policy (inpaint: unless a pipeline)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
IMAGE_COLUMNS = ("image", "jpg", "png", "img")
CAPTION_COLUMNS = ("caption", "text", "prompt")
SOURCE = "realalign"


@dataclass
class RealImage:
    """A real image and its caption; ``origin`` names it in error messages."""

    caption: str
    image: ImageSource
    origin: str


# ----------------------------------------------------------------------------- readers


def _caption_of(obj: dict, origin: str) -> str:
    for key in CAPTION_COLUMNS:
        if isinstance(obj.get(key), str) and obj[key].strip():
            return obj[key].strip()
    raise ValueError(f"{origin}: no caption; give a non-empty string under one of {list(CAPTION_COLUMNS)}")


def _read_metadata_jsonl(folder: Path) -> list[RealImage]:
    items = []
    meta = folder / "metadata.jsonl"
    for lineno, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        origin = f"{meta}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f'{origin}: not valid JSON ({e.msg}); write one {{"file_name": ..., "text": ...}} per line'
            ) from e
        name = obj.get("file_name") if isinstance(obj, dict) else None
        if not isinstance(name, str):
            raise ValueError(f'{origin}: needs "file_name" (the image, relative to {folder}) and a caption')
        if not (folder / name).is_file():
            raise ValueError(f"{origin}: image {name!r} not found in {folder}")
        items.append(RealImage(_caption_of(obj, origin), folder / name, origin))
    return items


def _read_sidecar_captions(folder: Path) -> list[RealImage]:
    images = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    missing = [f.name for f in images if not f.with_suffix(".txt").is_file()]
    if missing:
        raise ValueError(
            f"{folder}: {len(missing)} image(s) have no caption, e.g. {missing[:3]}; put the caption in "
            f"{Path(missing[0]).with_suffix('.txt')} beside each image, or list them in metadata.jsonl"
        )
    items = []
    for f in images:
        caption = f.with_suffix(".txt").read_text(encoding="utf-8").strip()
        if not caption:
            raise ValueError(f"{f.with_suffix('.txt')}: empty caption")
        items.append(RealImage(caption, f, str(f)))
    return items


def _read_parquet(files: list[Path]) -> list[RealImage]:
    import pyarrow.parquet as pq

    items = []
    for file in files:
        try:
            pf = pq.ParquetFile(file)
        except Exception as e:  # ArrowInvalid/OSError for a non-parquet file
            raise ValueError(f"{file}: not a readable parquet file ({e})") from e
        names = pf.schema_arrow.names
        image_col = next((c for c in IMAGE_COLUMNS if c in names), None)
        caption_col = next((c for c in CAPTION_COLUMNS if c in names), None)
        if image_col is None or caption_col is None:
            raise ValueError(
                f"{file}: found columns {names}; real-image parquet needs an image column (one of "
                f"{list(IMAGE_COLUMNS)}: encoded bytes, or a {{bytes, path}} struct) and a caption column "
                f"(one of {list(CAPTION_COLUMNS)})"
            )
        row = 0
        for batch in pf.iter_batches(batch_size=512, columns=[image_col, caption_col]):
            for image, caption in zip(batch.column(image_col).to_pylist(), batch.column(caption_col).to_pylist()):
                origin = f"{file}:{row}"
                row += 1
                if isinstance(image, dict):  # the Hugging Face datasets Image feature
                    image = image.get("bytes") or image.get("path")
                if image is None or not isinstance(caption, str) or not caption.strip():
                    raise ValueError(f"{origin}: {image_col} and a non-empty {caption_col} are required")
                items.append(RealImage(caption.strip(), image, origin))
    return items


def read_real_images(path: str | os.PathLike) -> list[RealImage]:
    """Real images with captions from a folder (metadata.jsonl or .txt sidecars) or parquet (a file or a folder)."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".parquet":
        items = _read_parquet([path])
    elif path.is_dir() and (path / "metadata.jsonl").is_file():
        items = _read_metadata_jsonl(path)
    elif path.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in path.iterdir()):
        items = _read_sidecar_captions(path)
    elif path.is_dir() and any(path.glob("*.parquet")):
        items = _read_parquet(sorted(path.glob("*.parquet")))
    elif not path.exists():
        raise FileNotFoundError(f"sail.real.data={path} does not exist")
    else:
        raise ValueError(
            f"{path}: not a folder of images with captions (metadata.jsonl, or a .txt beside each image) "
            "or real-image parquet"
        )
    if not items:
        raise ValueError(f"{path}: holds no real images")
    return items


# ----------------------------------------------------------------------------- perturbations


def gaussian_blur(pixels: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of pixels [B, C, H, W] (kernel radius ceil(3 sigma), edges replicated)."""
    if sigma <= 0:
        return pixels.clone()
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(pixels.dtype)
    c = pixels.shape[1]
    out = F.pad(pixels, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def pixel_noise(pixels: torch.Tensor, std: float, seeds: Sequence[int]) -> torch.Tensor:
    """Pixels plus N(0, std^2) noise, one seed per image, clamped to [-1, 1]."""
    noise = torch.stack([torch.randn(pixels.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    return (pixels + std * noise.to(pixels.dtype)).clamp(-1, 1)


def region_masks(height: int, width: int, fraction: float, seeds: Sequence[int]) -> torch.Tensor:
    """One random axis-aligned rectangle per seed covering about ``fraction`` of the area: [B, 1, H, W], 1 inside."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"mask fraction must be in (0, 1], got {fraction}")
    mh = min(height, max(1, round(height * math.sqrt(fraction))))
    mw = min(width, max(1, round(width * math.sqrt(fraction))))
    masks = torch.zeros(len(seeds), 1, height, width)
    for i, s in enumerate(seeds):
        gen = torch.Generator().manual_seed(int(s))
        top = int(torch.randint(0, height - mh + 1, (1,), generator=gen))
        left = int(torch.randint(0, width - mw + 1, (1,), generator=gen))
        masks[i, :, top : top + mh, left : left + mw] = 1.0
    return masks


# ----------------------------------------------------------------------------- encoding


def real_pixels(items: Sequence[RealImage], resolution: int, mode: str) -> tuple[torch.Tensor, list]:
    """Real images as pixels [B, C, H, W] in [-1, 1] (resized, centre-cropped) and their SDXL time ids."""
    prepared = [prepare_image(open_image(it.image, it.origin, "real"), resolution, mode, False) for it in items]
    return torch.from_numpy(np.stack([arr for arr, _ in prepared])), [ids for _, ids in prepared]


def encode_real(
    items: Sequence[RealImage],
    stack: DiffusionStack,
    *,
    resolution: int,
    loser: str,
    blur_sigma: float = 2.0,
    noise_std: float = 0.2,
    seed: int = 0,
    batch_size: int = 16,
    redraw=None,
    progress: bool = True,
) -> LatentPairs:
    """Real images as LatentPairs winners; losers are the perturbed copies for ``blur`` and ``noise``,
    else ``redraw``'s (a callable (pixels, items, seeds) -> pixels: an inpainting pipeline) when given,
    else a copy of the winner, replaced each round by the policy's loser.

    Both sides of a pair share the winner's SDXL time ids, so only the pixels tell them apart."""
    if loser not in REAL_LOSERS:
        raise ValueError(f"unknown RealAlign loser {loser!r}; choose from {REAL_LOSERS}")
    items = list(items)
    mode = image_mode(stack, resolution)
    prompts, embeds, pooled = prompt_table([it.caption for it in items], stack, batch_size=batch_size)
    row_of = {p: i for i, p in enumerate(prompts)}
    seeds = image_seeds(seed, len(items), per_item=3)  # winner, loser, pixel noise
    win, lose, time_ids = [], [], []
    bar = tqdm(total=len(items), desc="encode real images", unit="image", disable=not progress)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        pixels, chunk_ids = real_pixels(chunk, resolution, mode)
        time_ids += chunk_ids
        chunk_seeds = seeds[start : start + len(chunk)]
        origins = [it.origin for it in chunk]
        win.append(encode_pixels(pixels, stack, chunk_seeds[:, 0], origins))
        if loser == "blur":
            lose.append(encode_pixels(gaussian_blur(pixels, blur_sigma), stack, chunk_seeds[:, 1], origins))
        elif loser == "noise":
            lose.append(
                encode_pixels(pixel_noise(pixels, noise_std, chunk_seeds[:, 2]), stack, chunk_seeds[:, 1], origins)
            )
        elif redraw is not None:
            lose.append(encode_pixels(redraw(pixels, chunk, chunk_seeds[:, 2]), stack, chunk_seeds[:, 1], origins))
        else:
            lose.append(win[-1].clone())
        bar.update(len(chunk))
    bar.close()
    ids = torch.tensor(time_ids, dtype=torch.float32) if stack.is_sdxl else None
    return LatentPairs(
        win=torch.cat(win),
        lose=torch.cat(lose),
        prompt_index=torch.tensor([row_of[it.caption] for it in items], dtype=torch.int64),
        prompts=prompts,
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        time_ids_win=ids,
        time_ids_lose=None if ids is None else ids.clone(),
        label=torch.ones(len(items)),
        source=[SOURCE] * len(items),
    )


def captions(pairs: LatentPairs) -> list[str]:
    """Each pair's prompt, in pair order."""
    return [pairs.prompts[i] for i in pairs.prompt_index.tolist()]
