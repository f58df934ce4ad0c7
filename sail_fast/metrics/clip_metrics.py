"""Metrics on a transformers CLIP model: PickScore, CLIP score, and the LAION aesthetic score.

- PickScore: a CLIP-H fine-tuned on Pick-a-Pic; score = logit_scale.exp() * cos(image, text),
  the logit the model was trained with (about 20-23 for good SD images).
- CLIP score: 100 * max(cos(image, text), 0), the convention of most text-to-image papers.
- Aesthetic (LAION aesthetic predictor v2): the L2-normalised CLIP ViT-L/14 image embedding
  through a linear MLP 768-1024-128-64-16-1 (dropouts between, no activations); about 1-10.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from .base import Metric, default_device, load_head_state, mlp_head, require_files

CLIP_WEIGHTS = {"config": ("config.json",), "weights": ("model.safetensors", "pytorch_model.bin")}
CLIP_IMAGE_PROCESSOR = ("preprocessor_config.json",)
CLIP_TOKENIZER = ("tokenizer.json", "vocab.json")


def _processor_dir(root: Path, with_tokenizer: bool, metric: str) -> Path:
    """Processor files sit beside the weights or in ``processor/`` (PickScore ships its processor separately)."""
    expected = {"image processor": CLIP_IMAGE_PROCESSOR}
    if with_tokenizer:
        expected["tokenizer"] = CLIP_TOKENIZER
    for candidate in (root, root / "processor"):
        if all(any((candidate / n).exists() for n in names) for names in expected.values()):
            return candidate
    require_files(root, metric, expected)  # raises, listing what is missing
    raise AssertionError


class ClipFeatures:
    """L2-normalised CLIP image and text embeddings from a transformers CLIPModel."""

    def __init__(self, model, image_processor, tokenizer=None, *, device=None) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device).eval()
        self.dtype = next(model.parameters()).dtype
        self.image_processor = image_processor
        self.tokenizer = tokenizer

    @classmethod
    def from_dir(
        cls,
        root: str | Path,
        metric: str,
        *,
        with_tokenizer: bool = True,
        device=None,
        dtype: torch.dtype = torch.float32,
    ) -> "ClipFeatures":
        """From a local transformers CLIP directory; never reaches for a hub."""
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        root = Path(root)
        require_files(root, metric, CLIP_WEIGHTS)
        processor_dir = _processor_dir(root, with_tokenizer, metric)
        model = CLIPModel.from_pretrained(root, local_files_only=True, torch_dtype=dtype)
        image_processor = CLIPImageProcessor.from_pretrained(processor_dir, local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(processor_dir, local_files_only=True) if with_tokenizer else None
        return cls(model, image_processor, tokenizer, device=device)

    def image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        pooled = self.model.vision_model(pixel_values=pixels.to(self.device, self.dtype)).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        limit = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=limit, return_tensors="pt"
        )
        pooled = self.model.text_model(
            input_ids=tokens.input_ids.to(self.device), attention_mask=tokens.attention_mask.to(self.device)
        ).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)


class _ImageTextCosine(Metric):
    """A CLIP directory's image-text cosine; subclasses map it to their published score."""

    def __init__(self, root: str | Path, **kw) -> None:
        self.weights = str(root)
        self.clip = ClipFeatures.from_dir(root, self.name, **kw)

    def cosine(self, images, prompts) -> torch.Tensor:
        return (self.clip.image_embeds(images) * self.clip.text_embeds(prompts)).sum(-1)


# SmPO-Diffusion's fixed min-max range of PickScore's raw image-text cosine (JaydenLyh/SmPO, train.py).
PICKSCORE_COSINE_RANGE = (0.11543526500463486, 0.28201571106910706)


class PickScore(_ImageTextCosine):
    name, version = "pickscore", "PickScore_v1"

    @property
    def soft_label_range(self) -> tuple[float, float]:
        # Our score is logit_scale * cosine; the published range is on the cosine.
        scale = float(self.clip.model.logit_scale.detach().exp())
        return PICKSCORE_COSINE_RANGE[0] * scale, PICKSCORE_COSINE_RANGE[1] * scale

    def _score_batch(self, images, prompts):
        return self.clip.model.logit_scale.exp().float() * self.cosine(images, prompts)


class ClipScore(_ImageTextCosine):
    name, version = "clipscore", "CLIP score (100 * max(cos, 0))"

    def _score_batch(self, images, prompts):
        return 100 * self.cosine(images, prompts).clamp(min=0)


class AestheticScore(Metric):
    """``root`` holds ``clip/`` (CLIP ViT-L/14 in transformers format) and the head file."""

    name, version = "aesthetic", "LAION aesthetic predictor v2 (sac+logos+ava1, ViT-L/14, linear MSE head)"
    HEAD_FILES = ("sac+logos+ava1-l14-linearMSE.pth", "aesthetic_head.safetensors", "aesthetic_head.pth")

    def __init__(self, root: str | Path, **kw) -> None:
        self.weights = str(root)
        found = require_files(root, self.name, {"CLIP ViT-L/14 directory": ("clip",), "head": self.HEAD_FILES})
        self.clip = ClipFeatures.from_dir(found["CLIP ViT-L/14 directory"], self.name, with_tokenizer=False, **kw)
        embed_dim = self.clip.model.config.projection_dim
        self.head = mlp_head()
        if embed_dim != self.head[0].in_features:
            raise ValueError(
                f"aesthetic: the head takes 768-d ViT-L/14 embeddings but {found['CLIP ViT-L/14 directory']} "
                f"projects to {embed_dim}; point clip/ at CLIP ViT-L/14"
            )
        self.head.load_state_dict(load_head_state(found["head"]))
        self.head.to(self.clip.device).eval()

    def _score_batch(self, images, prompts):
        return self.head(self.clip.image_embeds(images)).squeeze(-1)
