"""A run config's ``model:`` section to a ``DiffusionStack``: a local diffusers directory or hub id, a tiny
random stack, or the toy world's shipped model.
"""

from __future__ import annotations

import torch

from .stack import TOY_MODEL_DIR, DiffusionStack, check_hub_weights, load_stack
from .tiny import tiny_stack


def build_stack(model, *, seed: int = 0, device: torch.device | str = "cpu") -> DiffusionStack:
    """The stack a config's ``model:`` section names (a ModelConfig): a directory or hub id,
    a tiny random stack, or the toy world's shipped one."""
    if model.toy:
        stack = load_stack(TOY_MODEL_DIR, kind="sd15", with_vae=False)
    elif model.tiny is not None:
        stack = tiny_stack(
            model.tiny,
            seed=seed,
            sample_size=model.tiny_sample_size,
            in_channels=model.tiny_in_channels,
            with_vae=model.with_vae,
        )
    else:
        stack = load_stack(model.path, kind=model.kind, with_vae=model.with_vae)
    for part in (stack.unet, stack.text_encoder, stack.text_encoder_2, stack.vae):
        if part is not None:
            part.to(device)
    return stack


def check_model_available(model) -> None:
    """Fail in seconds, in one line, when the config's model cannot be loaded here (hub weights, offline,
    not in the cache); called before a run does any work."""
    if model.path is not None:
        check_hub_weights(model.path)
