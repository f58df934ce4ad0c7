"""The optimizers a DPO stage can use."""

from __future__ import annotations

import torch


def build_optimizer(name: str, params, train) -> torch.optim.Optimizer:
    """AdamW, bitsandbytes' 8-bit AdamW, or Adafactor (the paper's SDXL setting)."""
    params = [p for p in params if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(
            params, lr=train.learning_rate, betas=train.adam_betas, weight_decay=train.weight_decay
        )
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(
            params, lr=train.learning_rate, betas=train.adam_betas, weight_decay=train.weight_decay
        )
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params,
            lr=train.learning_rate,
            relative_step=False,
            scale_parameter=False,
            warmup_init=False,
            weight_decay=train.weight_decay,
        )
    raise ValueError(f"unknown optimizer {name!r}; choose adamw, adamw8bit or adafactor")
