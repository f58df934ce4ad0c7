"""sail-fast: Self-Amplified Iterative Learning for diffusion models, fast."""

import importlib

from .kernels import dpo_logit, implicit_reward, paired_mse

__version__ = "0.1.0"

# Heavier parts load on first use, so `sail_fast.kernels` alone does not import diffusers.
_LAZY = {
    "ImplicitRewardScorer": "reward",
    "BestWorst": "reward",
    "DiffusionStack": "models",
    "PromptEmbeds": "models",
    "load_stack": "models",
    "tiny_stack": "models",
    "Candidates": "sampling",
    "generate_candidates": "sampling",
    "decode_latents": "images",
    "image_grid": "images",
}

__all__ = ["__version__", "dpo_logit", "implicit_reward", "paired_mse", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'sail_fast' has no attribute {name!r}")
