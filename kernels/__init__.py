"""Fused kernels and their plain-torch reference twins (imported as ``sail_fast.kernels``)."""

from .paired_mse import paired_mse, resolve_backend, triton_available
from .preference import dpo_logit, implicit_reward
from .reference import paired_mse_reference

__all__ = [
    "dpo_logit",
    "implicit_reward",
    "paired_mse",
    "paired_mse_reference",
    "resolve_backend",
    "triton_available",
]
