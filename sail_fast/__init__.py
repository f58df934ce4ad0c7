"""sail-fast: Self-Amplified Iterative Learning for diffusion models, fast."""

import importlib

__version__ = "0.1.0"

# Everything loads on first use: `sail_fast.kernels` alone does not import diffusers, and `import sail_fast`
# (the start of every command) imports no torch, so Ctrl-C during a command's start-up is one line.
_LAZY = {
    "dpo_logit": "kernels",
    "implicit_reward": "kernels",
    "paired_mse": "kernels",
    "ImplicitRewardScorer": "reward.scorer",
    "BestWorst": "reward.scorer",
    "DiffusionStack": "diffusion.stack",
    "PromptEmbeds": "diffusion.stack",
    "load_stack": "diffusion.stack",
    "tiny_stack": "diffusion.stack",
    "Candidates": "diffusion.sampling",
    "generate_candidates": "diffusion.sampling",
    "decode_latents": "diffusion.images",
    "image_grid": "diffusion.images",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'sail_fast' has no attribute {name!r}")
