"""Tiny random SD1.5- and SDXL-shaped stacks (tests, benchmarks): the real diffusers and transformers
classes, built small and offline.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from .stack import KINDS, DiffusionStack, _finalize

# ----------------------------------------------------------------------------- tiny stacks

# A few merges so the tiny tokenizer exercises real BPE merging, not just characters.
_TINY_MERGES = [
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("an", "d</w>"),
    ("o", "f</w>"),
    ("i", "n"),
    ("in", "g</w>"),
    ("o", "n</w>"),
    ("e", "r</w>"),
]


def _tiny_tokenizer(max_length: int, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A real CLIPTokenizer over the 256 byte-level symbols, so any text tokenizes."""
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = sorted(ByteLevel.alphabet())
    vocab = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in _TINY_MERGES]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
        with open(merges_file, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _TINY_MERGES))
        return CLIPTokenizer(vocab_file, merges_file, pad_token=pad_token, model_max_length=max_length)


def _tiny_text_config(tokenizer: CLIPTokenizer, hidden: int, projection_dim: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=projection_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_stack(
    kind: str = "sd15",
    *,
    seed: int = 0,
    sample_size: int = 16,
    in_channels: int = 4,
    with_vae: bool = False,
    dtype: torch.dtype = torch.float32,
) -> DiffusionStack:
    """A tiny random stack with the real classes and SD-shaped configs, for tests.

    Dimensions differ between the two SDXL encoders (16 and 32, pooled 24) so a
    mixed-up concatenation or pooled source shows up as a shape error.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    max_length = 77
    sdxl = kind == "sdxl"

    # fork_rng: building a tiny stack must not disturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = _tiny_tokenizer(max_length)
        if sdxl:
            # SDXL's second tokenizer pads with "!", as on the Hub.
            tokenizer_2 = _tiny_tokenizer(max_length, pad_token="!")
            text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, hidden=16, projection_dim=16))
            text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(tokenizer_2, hidden=32, projection_dim=24))
            cross_dim = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
            pooled_dim = text_encoder_2.config.projection_dim
        else:
            tokenizer_2 = text_encoder_2 = None
            text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, hidden=32, projection_dim=32))
            cross_dim = text_encoder.config.hidden_size

        addition_time_embed_dim = 8
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=in_channels,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_dim,
            attention_head_dim=(2, 4),
            norm_num_groups=8,
            use_linear_projection=sdxl,
            addition_embed_type="text_time" if sdxl else None,
            addition_time_embed_dim=addition_time_embed_dim if sdxl else None,
            projection_class_embeddings_input_dim=pooled_dim + 6 * addition_time_embed_dim if sdxl else None,
        )
        vae = None
        if with_vae:
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                latent_channels=in_channels,
                block_out_channels=(32, 64),
                down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                layers_per_block=1,
                norm_num_groups=8,
                sample_size=sample_size * 2,
                scaling_factor=0.13025 if sdxl else 0.18215,
            )

    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="epsilon",
        steps_offset=1,
    )
    stack = DiffusionStack(kind, unet, scheduler, tokenizer, text_encoder, tokenizer_2, text_encoder_2, vae)
    return _finalize(stack, dtype, "cpu")
