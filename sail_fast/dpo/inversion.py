"""Few-step DDIM inversion of clean latents, ReNoise-style (SmPO-Diffusion's noising).

Instead of forward noising x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps with a random eps, SmPO takes
x_t from inverting x_0 along the model's own deterministic trajectory, so the training noise is
the noise the model would have denoised from. From the clean sample (a = 1) to t in ``steps``
equal hops tau_1 < ... < tau_S = t, each hop

    e     = model(x, tau)                        the noise seen at the current point
    x'    = sqrt(a_next) x0_hat(e) + sqrt(1 - a_next) e
    e_bar = (e + model(x', tau_next)) / 2        ReNoise: average the two evaluations
    x     = sqrt(a_next) x0_hat(e_bar) + sqrt(1 - a_next) e_bar

with x0_hat(e) = (x - sqrt(1 - a) e) / sqrt(a). The training target is the noise that x_t holds
relative to x_0: eps = (x_t - sqrt(a_t) x_0) / sqrt(1 - a_t).

Each hop is diffusers' ``DDIMInverseScheduler.step``; the test suite runs that scheduler (trailing grid on
the schedule cut at t) and matches it to 1e-5. The hops are written out here because the scheduler takes
one timestep per call and every pair of a batch draws its own t. Against the authors' code (JaydenLyh/SmPO
``train.py``, diffusers 0.20) this lands exactly on t, where theirs stops on the grid point above t but takes
eps at t, and the refinement asks the model at the hop's end level, where theirs repeats the start level.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def ddim_invert(
    model, x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, *, steps: int, **model_kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t [B, ...] and its noise eps for clean latents x0 [B, ...] at integer timesteps t [B].

    ``model(x, timesteps, **model_kwargs).sample`` predicts eps; ``alphas_cumprod`` is the
    scheduler's. Costs 2 * ``steps`` model evaluations, without gradients.
    """
    if steps < 1:
        raise ValueError(f"inversion steps must be >= 1, got {steps}")
    x0 = x0.float()
    shape = (-1,) + (1,) * (x0.dim() - 1)
    alphas = alphas_cumprod.to(x0.device, torch.float64)
    t = t.to(x0.device).long()

    def alpha(tau: torch.Tensor) -> torch.Tensor:
        return alphas[tau].float().view(shape)

    dtype = next(model.parameters(), torch.empty(0)).dtype  # inputs go in the weights' dtype

    def predict(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        return model(x.to(dtype), tau, **model_kwargs).sample.float()

    x, a, tau = x0, torch.ones_like(alpha(t)), torch.zeros_like(t)
    for i in range(1, steps + 1):
        tau_next = torch.div(t * i, steps, rounding_mode="floor")
        a_next = alpha(tau_next)
        e = predict(x, tau)
        x_hat = (x - (1 - a).sqrt() * e) / a.sqrt()
        x_guess = a_next.sqrt() * x_hat + (1 - a_next).sqrt() * e
        e_bar = (e + predict(x_guess, tau_next)) / 2
        x_hat = (x - (1 - a).sqrt() * e_bar) / a.sqrt()
        x, a, tau = a_next.sqrt() * x_hat + (1 - a_next).sqrt() * e_bar, a_next, tau_next
    eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
    return x, eps
