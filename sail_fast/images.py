"""Latents to pictures: VAE decoding for grids and metrics, never inside the SAIL loop."""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageDraw


@torch.inference_mode()
def decode_latents(latents: torch.Tensor, vae=None, *, batch_size: int = 8) -> list[Image.Image]:
    """Latents [B, C, H, W] to PIL images.

    With a VAE, latents are unscaled by ``vae.config.scaling_factor`` and decoded in
    batches; without one (pixel-space models such as the toy world) they are taken to be
    images in [-1, 1] already.
    """
    if latents.dim() != 4:
        raise ValueError(f"latents must be [B, C, H, W], got shape {tuple(latents.shape)}")
    processor = VaeImageProcessor(do_resize=False)
    if vae is None:
        return processor.postprocess(latents.float().cpu(), output_type="pil")
    images = []
    param = next(vae.parameters())
    for chunk in latents.split(batch_size):
        decoded = vae.decode(chunk.to(param.device, param.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        images += processor.postprocess(decoded.float().cpu(), output_type="pil")
    return images


def image_grid(images: Sequence[Image.Image], columns: int, captions: Sequence[str] | None = None) -> Image.Image:
    """Tile images row by row; an optional caption is written under each one."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    w, h = images[0].size
    caption_h = 12 if captions is not None else 0
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * w, rows * (h + caption_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        x, y = (i % columns) * w, (i // columns) * (h + caption_h)
        grid.paste(img.convert("RGB").resize((w, h)), (x, y))
        if captions is not None:
            draw.text((x + 1, y + h), captions[i], fill="black")
    return grid


def enlarge(images: Sequence[Image.Image], min_side: int = 64) -> list[Image.Image]:
    """Scale small images up by a whole factor (nearest neighbour) so a grid of 16 px digits is legible."""
    scale = max(1, min_side // max(1, images[0].width)) if images else 1
    return [im.resize((im.width * scale, im.height * scale), resample=Image.Resampling.NEAREST) for im in images]
