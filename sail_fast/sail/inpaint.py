"""RealAlign's inpainted losers: a soft mask over each real image's salient subject, and the subject
redrawn for the image's own caption, so the loser differs from the real image where people look.

The mask (``sail.real.mask``, 1 = redraw) comes from a folder of masks named as the images, from a
saliency model given as ``path/to/file.py:function``, or from the world (the toy world: the stroke
dilated by one pixel). The redraw is the round's policy (SDEdit inside the soft mask, each round) or a
local diffusers inpainting pipeline (once, when the real images are encoded; RealAlign: 50 steps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..runs.callables import load_callable
from .realalign import IMAGE_SUFFIXES, RealImage

MaskFn = Callable[[Sequence[RealImage], torch.Tensor], torch.Tensor]  # (items, pixels [B, C, H, W]) -> [B, 1, H, W]


def mask_source(spec: str | None, world_masks: Callable[[torch.Tensor], torch.Tensor] | None) -> MaskFn:
    """The subject-mask function ``sail.real.mask`` names (unset: the world's own)."""
    if spec is None:
        if world_masks is None:
            raise ValueError(
                "sail.real.loser: inpaint needs subject masks: set sail.real.mask to a folder of masks "
                "named as the images, or to a saliency model 'path/to/file.py:function'"
            )
        return lambda items, pixels: world_masks(pixels)
    if spec.rpartition(":")[0].endswith(".py"):
        saliency = load_callable(spec, "sail.real.mask")
        return lambda items, pixels: saliency(pixels)
    folder = Path(spec)
    if not folder.is_dir():
        raise FileNotFoundError(f"sail.real.mask={spec} is neither a folder of masks nor 'path/to/file.py:function'")
    return lambda items, pixels: _masks_from_folder(folder, items, pixels.shape[-2:])


def _masks_from_folder(folder: Path, items: Sequence[RealImage], size) -> torch.Tensor:
    masks = []
    for item in items:
        if not isinstance(item.image, (str, Path)):
            raise ValueError(
                f"{item.origin}: a mask folder pairs masks with image files by name; this image has no "
                "file name (parquet). Give sail.real.mask as a saliency function instead"
            )
        stem = Path(item.image).stem
        found = [folder / (stem + suffix) for suffix in IMAGE_SUFFIXES if (folder / (stem + suffix)).is_file()]
        if not found:
            raise FileNotFoundError(f"{item.origin}: no mask {stem}.png (or another image type) in {folder}")
        mask = Image.open(found[0]).convert("L").resize((size[1], size[0]), Image.Resampling.BILINEAR)
        masks.append(torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0))
    return torch.stack(masks)[:, None]


def subject_masks(mask_fn: MaskFn, items: Sequence[RealImage], pixels: torch.Tensor) -> torch.Tensor:
    """Masks [B, 1, H, W] in [0, 1] for pixels [B, C, H, W] in [-1, 1], checked."""
    masks = torch.as_tensor(mask_fn(items, pixels)).float()
    want = (len(pixels), 1, *pixels.shape[-2:])
    if tuple(masks.shape) != want:
        raise ValueError(
            f"the subject mask function returned shape {tuple(masks.shape)}; expected {want} "
            "(one [1, H, W] mask per image)"
        )
    if not torch.isfinite(masks).all() or masks.min() < -1e-4 or masks.max() > 1 + 1e-4:
        raise ValueError(
            f"subject masks must lie in [0, 1] (1 = redraw); got [{masks.min():.3g}, {masks.max():.3g}] "
            f"for {items[0].origin}..."
        )
    return masks.clamp(0, 1)


def latent_masks(masks: torch.Tensor, size) -> torch.Tensor:
    """Pixel masks [B, 1, H, W] averaged down to the latent grid: a soft mask for the policy's redraw."""
    return masks if tuple(masks.shape[-2:]) == tuple(size) else F.interpolate(masks, size=tuple(size), mode="area")


class PipelineInpainter:
    """A local diffusers inpainting pipeline directory (e.g. an SD1.5 inpainting model) that redraws the
    masked subject for the caption: pixels [B, 3, H, W] in [-1, 1] in and out."""

    def __init__(self, path: str | Path, *, steps: int, strength: float, device: torch.device) -> None:
        from diffusers import AutoPipelineForInpainting

        path = Path(path)
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"sail.real.inpaint_pipeline={path} is not a diffusers pipeline directory "
                "(no model_index.json); save one with pipeline.save_pretrained(path)"
            )
        self.pipe = AutoPipelineForInpainting.from_pretrained(path, local_files_only=True).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        if getattr(self.pipe, "safety_checker", None) is not None:
            self.pipe.safety_checker = None  # a black image would be a loser for the wrong reason
        self.steps, self.strength, self.device = steps, strength, device

    @torch.no_grad()
    def __call__(
        self, pixels: torch.Tensor, masks: torch.Tensor, captions: Sequence[str], seeds: Sequence[int]
    ) -> torch.Tensor:
        gens = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]
        out = self.pipe(
            prompt=list(captions),
            image=(pixels + 1) / 2,
            mask_image=masks,
            height=pixels.shape[-2],
            width=pixels.shape[-1],
            num_inference_steps=self.steps,
            strength=self.strength,
            generator=gens,
            output_type="pt",
        ).images
        return (out.float().cpu() * 2 - 1).clamp(-1, 1)
