"""UNet architectures by name, built with random weights (no download): the real SD1.5 and
SDXL layouts for GPU benchmarks and memory plans, and a small SD-shaped one for CPUs."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

_SD15_BLOCKS = dict(
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    in_channels=4,
    out_channels=4,
)

UNET_CONFIGS: dict[str, dict] = {
    # Stable Diffusion 1.5's UNet (860M parameters), 64x64 latents for 512px images.
    "sd15": dict(
        **_SD15_BLOCKS,
        block_out_channels=(320, 640, 1280, 1280),
        cross_attention_dim=768,
        attention_head_dim=8,
        sample_size=64,
    ),
    # SDXL base's UNet (2.6B parameters), 128x128 latents for 1024px images.
    "sdxl": dict(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        in_channels=4,
        out_channels=4,
        sample_size=128,
    ),
    # SD1.5's layout (four levels, two layers each, cross-attention to 77x768 text) with
    # narrow channels: a UNet a 2-core CPU scores and trains in seconds.
    # (diffusers' SD configs name the head *count* attention_head_dim; here 32-wide heads.)
    "sd15-small": dict(
        **_SD15_BLOCKS,
        block_out_channels=(32, 64, 128, 128),
        cross_attention_dim=768,
        attention_head_dim=(1, 2, 4, 4),
        norm_num_groups=32,
        sample_size=16,
    ),
    # The same layout twice as wide at 32x32 latents (21.8M parameters): where a batch-1 forward is
    # already compute-bound on a CPU, so batching pays far less than at sd15-small.
    "sd15-medium": dict(
        **_SD15_BLOCKS,
        block_out_channels=(48, 96, 192, 192),
        cross_attention_dim=768,
        attention_head_dim=(2, 4, 8, 8),
        norm_num_groups=16,
        sample_size=32,
    ),
}

# Text conditioning each architecture expects: (tokens, width, pooled width or None).
TEXT_SHAPES = {
    "sd15": (77, 768, None),
    "sdxl": (77, 2048, 1280),
    "sd15-small": (77, 768, None),
    "sd15-medium": (77, 768, None),
}


def build_unet(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu") -> UNet2DConditionModel:
    if name not in UNET_CONFIGS:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(UNET_CONFIGS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_CONFIGS[name])
    return unet.to(device=device, dtype=dtype)


def random_conditioning(name: str, batch: int, *, seed: int = 0, dtype=torch.float32, device="cpu"):
    """Text embeddings (and SDXL's added conditioning) of the right shapes, random values."""
    tokens, width, pooled = TEXT_SHAPES[name]
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, tokens, width, generator=gen).to(device, dtype)
    added = None
    if pooled is not None:
        size = UNET_CONFIGS[name]["sample_size"] * 8
        time_ids = torch.tensor([size, size, 0, 0, size, size], dtype=dtype).repeat(batch, 1).to(device)
        added = {"text_embeds": torch.randn(batch, pooled, generator=gen).to(device, dtype), "time_ids": time_ids}
    return embeds, added
