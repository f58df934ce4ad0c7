"""Forward noising and the regression target, shared by the DPO trainer and the implicit reward."""

from __future__ import annotations

import torch


def noised_and_target(
    scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_t = add_noise(x0, noise, t)`` and what the UNet regresses onto at ``x_t``: the noise for an
    epsilon-prediction scheduler, the velocity for v-prediction. Draws nothing: ``noise`` and ``t`` are the caller's."""
    x_t = scheduler.add_noise(x0, noise, t)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
    return x_t, target
