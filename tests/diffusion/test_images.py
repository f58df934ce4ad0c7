"""Latents to pictures: VAE decoding and grids."""

import numpy as np
import pytest
import torch

from sail_fast.diffusion.images import decode_latents, image_grid
from sail_fast.diffusion.tiny import tiny_stack


def test_pixel_space_latents_map_minus_one_to_one_onto_0_255():
    latents = torch.stack([torch.full((3, 4, 5), -1.0), torch.full((3, 4, 5), 1.0)])
    black, white = decode_latents(latents)
    assert black.size == (5, 4) and black.getpixel((0, 0)) == (0, 0, 0)
    assert white.getpixel((4, 3)) == (255, 255, 255)


def test_vae_decode_matches_the_vae_itself():
    stack = tiny_stack("sd15", with_vae=True)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = decode_latents(latents, stack.vae, batch_size=2)
    scale = stack.vae_scale_factor
    assert [im.size for im in images] == [(8 * scale, 8 * scale)] * 3
    with torch.no_grad():
        direct = stack.vae.decode(latents[1:2] / stack.vae.config.scaling_factor).sample
    expect = ((direct[0].clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).round()
    got = torch.from_numpy(np.asarray(images[1], dtype=np.float32))
    assert (got - expect).abs().max() <= 1.0


def test_grid_layout_and_errors():
    latents = torch.zeros(5, 3, 4, 6)
    grid = image_grid(decode_latents(latents), columns=2, captions=[f"r={i}" for i in range(5)])
    # Each caption gets a band of readable text under its picture: one 10 px line (+ 2 px leading), 2 px margin.
    assert grid.size == (2 * 6, 3 * (4 + 14))
    with pytest.raises(ValueError, match="2 captions for 5 images"):
        image_grid(decode_latents(latents), columns=2, captions=["a", "b"])
    with pytest.raises(ValueError, match=r"latents must be \[B, C, H, W\]"):
        decode_latents(torch.zeros(3, 4))
