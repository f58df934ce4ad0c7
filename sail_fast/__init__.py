"""sail-fast: Self-Amplified Iterative Learning for diffusion models, fast."""

import importlib

__version__ = "0.1.0"

# Everything loads on first use: `sail_fast.kernels` alone does not import diffusers, and `import sail_fast`
# (the start of every command) imports no torch, so Ctrl-C during a command's start-up is one line.
_LAZY = {
    "dpo_logit": "kernels",
    "implicit_reward": "kernels",
    "paired_mse": "kernels",
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

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'sail_fast' has no attribute {name!r}")
