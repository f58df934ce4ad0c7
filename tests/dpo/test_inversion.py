"""SmPO's few-step ReNoise DDIM inversion: exact on models whose answer is known, equal to a
per-sample literal loop, and wired into the DPO trainer."""

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDPMScheduler
from torch import nn

from sail_fast.data.latent_pairs import LatentPairs
from sail_fast.diffusion.build import build_stack
from sail_fast.dpo.builder import trainer_for
from sail_fast.dpo.inversion import ddim_invert
from sail_fast.runs.config import load_config

REPO = Path(__file__).resolve().parents[2]
ALPHAS = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod


@dataclass
class Out:
    sample: torch.Tensor


class ConstantNoise(nn.Module):
    def __init__(self, eps):
        super().__init__()
        self.eps = nn.Parameter(eps, requires_grad=False)

    def forward(self, x, t, **_):
        return Out(self.eps.expand_as(x))


class LinearNoise(nn.Module):
    """eps = W x + tau / 1000 * c: depends on the point and the timestep, so every hop matters."""

    def __init__(self, dim, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(dim, dim, generator=gen) * 0.3, requires_grad=False)
        self.c = nn.Parameter(torch.randn(dim, generator=gen), requires_grad=False)

    def forward(self, x, t, **_):
        flat = x.flatten(1)
        return Out((flat @ self.w.T + t.float().view(-1, 1) / 1000 * self.c).view_as(x))


def test_constant_noise_model_inverts_to_forward_noising():
    eps0 = torch.randn(1, 4, 3, 3)
    x0 = torch.randn(5, 4, 3, 3)
    t = torch.tensor([0, 1, 250, 600, 999])
    for steps in (1, 3):
        x_t, eps = ddim_invert(ConstantNoise(eps0), x0, t, ALPHAS, steps=steps)
        a = ALPHAS[t].float().view(-1, 1, 1, 1)
        torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(eps, eps0.expand_as(x0), atol=1e-4, rtol=1e-4)


def literal_inversion(model, x0, t, steps):
    """One sample at a time, with Python floats for the schedule, the hop equations as written."""
    x, a, tau = x0.double(), 1.0, 0
    for i in range(1, steps + 1):
        tau_next = (t * i) // steps
        a_next = float(ALPHAS[tau_next])

        def eps(z, s):
            return model(z.float()[None], torch.tensor([s])).sample[0].double()

        e = eps(x, tau)
        x_hat = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
        guess = math.sqrt(a_next) * x_hat + math.sqrt(1 - a_next) * e
        e_bar = (e + eps(guess, tau_next)) / 2
        x_hat = (x - math.sqrt(1 - a) * e_bar) / math.sqrt(a)
        x, a, tau = math.sqrt(a_next) * x_hat + math.sqrt(1 - a_next) * e_bar, a_next, tau_next
    return x.float(), ((x - math.sqrt(a) * x0.double()) / math.sqrt(1 - a)).float()


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_batched_inversion_equals_the_literal_loop(steps):
    model = LinearNoise(12)
    x0 = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([7, 400, 999, 123])
    x_t, eps = ddim_invert(model, x0, t, ALPHAS, steps=steps)
    for i in range(4):
        want_x, want_eps = literal_inversion(model, x0[i], int(t[i]), steps)
        torch.testing.assert_close(x_t[i], want_x, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(eps[i], want_eps, atol=1e-4, rtol=1e-4)
    # inverting is not forward noising with the model's first guess: the trajectory matters
    e0 = model(x0, torch.zeros(4, dtype=torch.long)).sample
    assert not torch.allclose(eps, e0, atol=1e-2)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        ddim_invert(model, x0, t, ALPHAS, steps=0)


def diffusers_inversion(model, x0, t, steps):
    """The same inversion as a loop over diffusers' DDIMInverseScheduler: its trailing grid on the schedule
    cut at t ends exactly at t, each step(e, tau, x) hops from tau - (t + 1) // steps (alpha 1 below 0) to
    tau, and ReNoise averages the prediction at the start with one at the first guess of the end."""
    betas = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).betas
    inverse = DDIMInverseScheduler(
        num_train_timesteps=t + 1,
        trained_betas=betas[: t + 1].numpy(),
        timestep_spacing="trailing",
        set_alpha_to_one=True,
        clip_sample=False,
    )
    inverse.set_timesteps(steps)
    hop = (t + 1) // steps
    x = x0[None].double()
    for tau in inverse.timesteps.tolist():

        def eps(z, level):
            return model(z.float(), torch.tensor([level])).sample.double()

        e = eps(x, max(tau - hop, 0))
        guess = inverse.step(e, tau, x).prev_sample
        x = inverse.step((e + eps(guess, tau)) / 2, tau, x).prev_sample
    a = float(ALPHAS[t])
    return x[0].float(), ((x[0] - math.sqrt(a) * x0.double()) / math.sqrt(1 - a)).float()


@pytest.mark.parametrize("steps", [5, 10])  # SmPO-Diffusion's SD1.5 and SDXL settings
def test_inversion_matches_a_diffusers_ddim_inverse_scheduler_loop(steps):
    model = LinearNoise(12, seed=2)
    x0 = torch.randn(3, 3, 2, 2, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([999, 599, 199])  # (t + 1) divisible by the steps: the scheduler's grid is our hops
    x_t, eps = ddim_invert(model, x0, t, ALPHAS, steps=steps)
    for i in range(3):
        want_x, want_eps = diffusers_inversion(model, x0[i], int(t[i]), steps)
        torch.testing.assert_close(x_t[i], want_x, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(eps[i], want_eps, atol=1e-5, rtol=1e-5)


def test_trainer_trains_with_inverted_noise_and_soft_labels(tmp_path):
    config = load_config(
        REPO / "configs/tiny.yaml",
        [
            f"output_dir={tmp_path}",
            "train.noising=ddim_inversion",
            "train.inversion_steps=2",
            "train.loss=smpo",
            "train.steps=2",
            "train.pairs_per_step=4",
            "train.micro_batch_pairs=4",
            "train.checkpoint_every=1000",
        ],
    )
    stack = build_stack(config.model, seed=0)
    gen = torch.Generator().manual_seed(0)
    m = 8
    side = stack.sample_size
    prompts = ["a cat", "a dog", ""]
    pairs = LatentPairs(
        torch.randn(m, 4, side, side, generator=gen),
        torch.randn(m, 4, side, side, generator=gen),
        torch.randint(0, 2, (m,), generator=gen),
        prompts,
        stack.encode_prompts(prompts).prompt_embeds,
        None,
        None,
        None,
        torch.full((m,), 0.8),
        ["human"] * m,
    )
    trainer = trainer_for(config, stack.unet, stack.scheduler, pairs)
    unset = config.model_copy(update={"train": config.train.model_copy(update={"inversion_steps": None})})
    assert trainer_for(unset, stack.unet, stack.scheduler, pairs).inversion_steps == 5  # SmPO-Diffusion's SD1.5 setting
    calls = []
    original = trainer.model.forward

    def counting(*a, **k):
        calls.append(torch.is_grad_enabled())
        return original(*a, **k)

    trainer.model.forward = counting
    metrics = trainer.train_step()
    assert math.isfinite(metrics["loss"])
    # 2 inversion hops x 2 evaluations without gradients, then the one training forward with them
    assert calls == [False] * 4 + [True]

    v_pred = DDPMScheduler.from_config({**stack.scheduler.config, "prediction_type": "v_prediction"})
    with pytest.raises(ValueError, match="epsilon-prediction"):
        trainer_for(config, stack.unet, v_pred, pairs)


@pytest.mark.parametrize("kind,beta,steps,optimizer", [("sd15", 2000, 5, "adamw"), ("sdxl", 5000, 10, "adafactor")])
def test_shipped_smpo_configs_reproduce_the_published_hyperparameters(kind, beta, steps, optimizer):
    """JaydenLyh/SmPO examples/sd15.sh and sdxl.sh: beta, the factor 10, inversion steps, lr 1e-8 x 1024, 200 steps."""
    train = load_config(REPO / f"configs/smpo-{kind}.yaml").train
    assert (train.loss, train.beta, train.smpo_scale, train.noising, train.inversion_steps) == (
        "smpo",
        beta,
        10,
        "ddim_inversion",
        steps,
    )
    assert (train.optimizer, train.learning_rate, train.steps, train.warmup_steps, train.pairs_per_step) == (
        optimizer,
        1.024e-5,
        200,
        100,
        1024,
    )
