"""Plain-torch twins of the fused kernels: the math the kernels are tested against."""

from __future__ import annotations

import torch


def paired_mse_reference(
    target: torch.Tensor, pred_policy: torch.Tensor, pred_ref: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean squared error of two predictions against one target, in fp32.

    Rows are the first dimension; the mean runs over every other dimension. Autograd
    gives the gradient w.r.t. ``pred_policy`` in its own dtype, like the fused kernel.
    """
    target32 = target.float()
    mse_policy = (pred_policy.float() - target32).square().flatten(1).mean(dim=1)
    mse_ref = (pred_ref.float() - target32).square().flatten(1).mean(dim=1)
    return mse_policy, mse_ref
