"""Latents to pictures: VAE decoding for grids and metrics, never inside the SAIL loop."""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageDraw, ImageFont


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
        images = processor.postprocess(latents.float().cpu(), output_type="pil")
    else:
        images = []
        param = next(vae.parameters())
        for chunk in latents.split(batch_size):
            decoded = vae.decode(chunk.to(param.device, param.dtype) / vae.config.scaling_factor, return_dict=False)[0]
            images += processor.postprocess(decoded.float().cpu(), output_type="pil")
    # A latent holding NaN or inf decodes to a black picture that looks like a real one: mark it instead.
    finite = is_finite(latents)
    return [im if ok else nan_marker(im.size) for im, ok in zip(images, finite.tolist())]


def is_finite(latents: torch.Tensor) -> torch.Tensor:
    """[B] bool: the latent holds no NaN or inf."""
    return torch.isfinite(latents.detach().float()).flatten(1).all(1).cpu()


def nan_marker(size: tuple[int, int]) -> Image.Image:
    """The picture shown in place of a non-finite one: red, crossed, labelled NaN."""
    w, h = size
    marker = Image.new("RGB", (w, h), (200, 30, 30))
    draw = ImageDraw.Draw(marker)
    draw.line([(0, 0), (w - 1, h - 1)], fill="white", width=max(1, w // 16))
    draw.line([(0, h - 1), (w - 1, 0)], fill="white", width=max(1, w // 16))
    draw.text((2, 2), "NaN", fill="white")
    return marker


def image_grid(images: Sequence[Image.Image], columns: int, captions: Sequence[str] | None = None) -> Image.Image:
    """Tile images row by row; an optional caption is written under each one, wrapped to the picture's width."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    w, h = images[0].size
    font = ImageFont.load_default(size=max(10, min(14, w // 6)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(measure, text, font, w - 2) for text in captions] if captions is not None else None
    line_h = font.size + 2
    caption_h = line_h * max(len(lines) for lines in wrapped) + 2 if wrapped else 0
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * w, rows * (h + caption_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        x, y = (i % columns) * w, (i // columns) * (h + caption_h)
        grid.paste(img.convert("RGB").resize((w, h)), (x, y))
        for k, line in enumerate(wrapped[i] if wrapped else []):
            draw.text((x + 1, y + h + 1 + k * line_h), line, fill="black", font=font)
    return grid


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int = 3) -> list[str]:
    """Greedy word wrap to ``width`` pixels, at most ``max_lines`` lines (the last one cut with ...)."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    lines.append(line)
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [" ".join(lines[max_lines - 1 :])]
        while lines[-1] and draw.textlength(lines[-1] + "...", font=font) > width:
            lines[-1] = lines[-1][:-1]
        lines[-1] += "..."
    return lines


def enlarge(images: Sequence[Image.Image], min_side: int = 64) -> list[Image.Image]:
    """Scale small images up by a whole factor (nearest neighbour) so a grid of 16 px digits is legible."""
    scale = max(1, min_side // max(1, images[0].width)) if images else 1
    return [im.resize((im.width * scale, im.height * scale), resample=Image.Resampling.NEAREST) for im in images]
