"""ImageReward: BLIP's image-grounded text encoder, its [CLS] feature through a linear MLP head,
standardised with the published reward mean and standard deviation.

    reward = (mlp(text_encoder(prompt, cross-attending to ViT(image))[CLS]) - 0.16717362830052426)
             / 1.0333394966054072

The checkpoint (``ImageReward.pt``) uses BLIP's original key names; it is loaded into
transformers' BlipVisionModel and BlipTextModel (the same ViT and BERT-with-cross-attention) by
renaming keys only: the ViT keeps its fused qkv projection in both layouts.

The weights directory holds ``ImageReward.pt``, ``med_config.json`` (the BERT config published with
it) and ``tokenizer/vocab.txt`` (bert-base-uncased's; ``[DEC]`` and ``[ENC]`` are added as BLIP
does). The ViT's size is read from the checkpoint's shapes (64-wide heads, as in every BLIP ViT).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from .base import Metric, MissingWeightsError, default_device, mlp_head, require_files

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_TEXT_TOKENS = 35
VISION_RENAMES = (
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
)


def _section(state: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def blip_vision_to_transformers(visual: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BLIP ViT keys (``visual_encoder.`` stripped) to BlipVisionModel keys."""
    out = {}
    for key, value in visual.items():
        for pattern, replacement in VISION_RENAMES:
            new, hits = re.subn(pattern, replacement, key)
            if hits:
                out[new] = value
                break
    return out


def vision_config_from_state(visual: dict[str, torch.Tensor]):
    from transformers import BlipVisionConfig

    width = visual["cls_token"].shape[-1]
    patch = visual["patch_embed.proj.weight"].shape[-1]
    layers = 1 + max(int(m.group(1)) for k in visual if (m := re.match(r"blocks\.(\d+)\.", k)))
    side = math.isqrt(visual["pos_embed"].shape[1] - 1)
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=visual["blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=width // 64,
        image_size=side * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
    )


def text_config_from_med(med: dict, encoder_width: int):
    from transformers import BlipTextConfig

    return BlipTextConfig(
        vocab_size=med["vocab_size"],
        hidden_size=med["hidden_size"],
        encoder_hidden_size=encoder_width,
        intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med.get("hidden_act", "gelu"),
        layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        pad_token_id=med.get("pad_token_id", 0),
    )


def _load_strict(module, state: dict, what: str, file: Path) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise MissingWeightsError(
            f"imagereward: {file} does not fit the {what}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}; is med_config.json the one published with it?"
        )


class ImageReward(Metric):
    name, version = "imagereward", "ImageReward v1.0"

    def __init__(self, root: str | Path, *, device=None, dtype: torch.dtype = torch.float32) -> None:
        from transformers import BertTokenizer, CLIPImageProcessor
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        found = require_files(
            root,
            self.name,
            {
                "checkpoint": ("ImageReward.pt",),
                "BERT config": ("med_config.json",),
                "tokenizer": ("tokenizer/vocab.txt",),
            },
        )
        self.weights = str(found["checkpoint"])
        self.device = torch.device(device) if device is not None else default_device()
        state = torch.load(found["checkpoint"], map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        visual = _section(state, "blip.visual_encoder.")
        if not visual:
            raise MissingWeightsError(f"imagereward: {found['checkpoint']} has no blip.visual_encoder.* weights")
        vision_config = vision_config_from_state(visual)
        self.vision = BlipVisionModel(vision_config)
        _load_strict(self.vision, blip_vision_to_transformers(visual), "BLIP ViT", found["checkpoint"])
        med = json.loads(found["BERT config"].read_text())
        self.text = BlipTextModel(text_config_from_med(med, vision_config.hidden_size), add_pooling_layer=False)
        _load_strict(self.text, _section(state, "blip.text_encoder."), "BLIP text encoder", found["checkpoint"])
        self.head = mlp_head()
        self.head.load_state_dict(_section(state, "mlp.layers."))
        for module in (self.vision, self.text, self.head):
            module.to(self.device, dtype).eval()
        self.dtype = dtype

        self.tokenizer = BertTokenizer.from_pretrained(found["tokenizer"].parent, local_files_only=True)
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
        if len(self.tokenizer) != med["vocab_size"]:
            raise ValueError(
                f"imagereward: tokenizer/vocab.txt plus [DEC] and [ENC] gives {len(self.tokenizer)} tokens "
                f"but med_config.json says {med['vocab_size']}; use bert-base-uncased's vocab.txt"
            )
        size = vision_config.image_size
        self.image_processor = CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )

    def raw_reward(self, images, prompts) -> torch.Tensor:
        """The head's output before standardisation."""
        pixels = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        image_embeds = self.vision(pixel_values=pixels.to(self.device, self.dtype)).last_hidden_state
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt"
        ).to(self.device)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        text = self.text(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        )
        return self.head(text.last_hidden_state[:, 0]).squeeze(-1).float()

    def _score_batch(self, images, prompts):
        return (self.raw_reward(images, prompts) - REWARD_MEAN) / REWARD_STD
