"""sail-fast: Self-Amplified Iterative Learning for diffusion models, fast."""

from .kernels import dpo_logit, implicit_reward, paired_mse

__version__ = "0.1.0"

__all__ = ["__version__", "dpo_logit", "implicit_reward", "paired_mse"]
