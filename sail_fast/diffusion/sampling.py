"""Batched candidate generation in latent space: many prompts x N candidates per UNet
call, classifier-free guidance as one doubled batch, and no VAE round trip.

Each candidate has its own seed, which draws its initial noise and every stochastic
sampler step; a candidate is therefore the same whatever batch it lands in, and the
same as a diffusers pipeline run with that seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from ..runs.seeding import derive_seed
from .stack import DiffusionStack, PromptEmbeds

# dpmsolver: DPM-Solver++ (2nd order, multistep), the sampler of RealAlign's replay buffer.
SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmsolver": DPMSolverMultistepScheduler}
# Paper settings: DDPM 50 steps with CFG 7.5 for SD1.5, DDIM 20 steps with CFG 5 for SDXL.
DEFAULTS = {"sd15": ("ddpm", 50, 7.5), "sdxl": ("ddim", 20, 5.0)}


@dataclass
class Candidates:
    """Generated latents [P, N, C, H, W] (fp32, CPU) and the per-candidate seeds [P, N]."""

    latents: torch.Tensor
    seeds: torch.Tensor


def candidate_seeds(seed: int, num_prompts: int, n_per_prompt: int) -> torch.Tensor:
    """Independent 63-bit seeds for candidate (p, n), a pure function of (seed, p, n)."""
    seeds = [derive_seed(seed, p, n) for p in range(num_prompts) for n in range(n_per_prompt)]
    return torch.tensor(seeds, dtype=torch.int64).view(num_prompts, n_per_prompt)


def sampling_scheduler(stack: DiffusionStack, sampler: str):
    """A fresh sampler built from the stack's training-scheduler config (never mutates it)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[sampler].from_config(stack.scheduler.config)


def unconditional_embeds(stack: DiffusionStack, like: PromptEmbeds) -> PromptEmbeds:
    """The CFG negative: zeros for SDXL (as its pipeline does for an empty prompt), "" for SD1.5."""
    if stack.kind == "sdxl":
        return PromptEmbeds(
            torch.zeros_like(like.prompt_embeds[:1]),
            None if like.pooled_prompt_embeds is None else torch.zeros_like(like.pooled_prompt_embeds[:1]),
        )
    return stack.encode_prompts([""])


def _sampler(stack: DiffusionStack, sampler: str | None, num_inference_steps: int | None, guidance_scale: float | None):
    """(scheduler with its timesteps set, steps, CFG scale), each defaulting to the paper's for the stack's kind."""
    default_sampler, default_steps, default_cfg = DEFAULTS[stack.kind]
    scheduler = sampling_scheduler(stack, sampler or default_sampler)
    steps = num_inference_steps or default_steps
    scheduler.set_timesteps(steps, device=stack.device)
    return scheduler, steps, default_cfg if guidance_scale is None else guidance_scale


def _guided_step(stack: DiffusionStack, scheduler, x, t, both: PromptEmbeds, added, guidance: float, gens):
    """One sampler step with classifier-free guidance; ``both`` holds the unconditional rows first."""
    model_in = scheduler.scale_model_input(torch.cat([x, x]), t)
    # One timestep per row, as the scorer and the trainer call the UNet: a compiled UNet then
    # serves all three with one graph per batch shape.
    t_rows = t.reshape(1).repeat(len(model_in))
    pred = stack.unet(
        model_in, t_rows, encoder_hidden_states=both.prompt_embeds, added_cond_kwargs=added, return_dict=False
    )[0]
    pred_uncond, pred_cond = pred.chunk(2)
    pred = pred_uncond + guidance * (pred_cond - pred_uncond)
    return scheduler.step(pred, t, x, generator=gens, return_dict=False, **step_options(scheduler))[0]


def step_options(scheduler) -> dict:
    """Keyword arguments that make ``scheduler.step`` self-consistent.

    DDIM with ``clip_sample`` clips its predicted x0 but, by default, keeps stepping with the
    unclipped eps: x0 and eps then describe different images. Under a cosine schedule in pixel
    space the clip is active on almost every step and the sampler draws the wrong digits (the toy
    base drew no correct "1" at 10 steps). ``use_clipped_model_output`` re-derives eps from the
    clipped x0, so the update stays a DDIM step of one image. DDPM's posterior mean is built from
    the clipped x0 alone and needs nothing.
    """
    if isinstance(scheduler, DDIMScheduler) and scheduler.config.clip_sample:
        return {"use_clipped_model_output": True}
    return {}


@torch.inference_mode()
def generate_candidates(
    stack: DiffusionStack,
    prompts: Sequence[str],
    n_per_prompt: int,
    *,
    sampler: str | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 64,
    height: int | None = None,
    width: int | None = None,
    prompt_embeds: PromptEmbeds | None = None,
    seeds: torch.Tensor | None = None,
    progress: bool = True,
) -> Candidates:
    """Sample ``n_per_prompt`` latents for each prompt with the stack's UNet.

    Defaults follow the paper for the stack's kind (see ``DEFAULTS``). ``batch_size``
    counts candidates per UNet call (the call itself is twice that, for CFG).
    ``height``/``width`` are in latent pixels (default: the UNet's sample size).
    ``prompt_embeds`` reuses embeddings computed elsewhere, one row per prompt.
    ``seeds`` [P, N] gives each candidate's seed explicitly (default: derived from ``seed``).
    """
    if n_per_prompt < 1 or batch_size < 1:
        raise ValueError(f"n_per_prompt and batch_size must be >= 1, got {n_per_prompt} and {batch_size}")
    prompts = list(prompts)
    scheduler, steps, guidance = _sampler(stack, sampler, num_inference_steps, guidance_scale)
    height = height or stack.sample_size
    width = width or stack.sample_size
    unet, device, dtype = stack.unet, stack.device, stack.dtype

    cond = prompt_embeds if prompt_embeds is not None else stack.encode_prompts(prompts)
    if len(cond) != len(prompts):
        raise ValueError(f"prompt_embeds has {len(cond)} rows for {len(prompts)} prompts")
    cond = cond.to(device, dtype)
    uncond = unconditional_embeds(stack, cond).to(device, dtype)
    if seeds is None:
        seeds = candidate_seeds(seed, len(prompts), n_per_prompt)
    elif tuple(seeds.shape) != (len(prompts), n_per_prompt):
        raise ValueError(
            f"seeds must be [{len(prompts)}, {n_per_prompt}] (prompts x candidates), got {tuple(seeds.shape)}"
        )
    flat_seeds = seeds.flatten().tolist()
    total = len(flat_seeds)
    out = torch.empty(total, unet.config.in_channels, height, width, dtype=torch.float32)

    bar = tqdm(total=total, desc="generate", unit="latent", disable=not progress)
    for start in range(0, total, batch_size):
        rows = torch.arange(start, min(start + batch_size, total))
        gens = [torch.Generator(device).manual_seed(s) for s in flat_seeds[start : start + len(rows)]]
        batch_cond = cond.index(rows // n_per_prompt)
        both = PromptEmbeds.cat([uncond.repeat_each(len(rows)), batch_cond])
        added = stack.added_cond_kwargs(both, height, width)  # latent size; pixels inside
        shape = (len(rows), unet.config.in_channels, height, width)
        x = randn_tensor(shape, generator=gens, device=device, dtype=dtype) * scheduler.init_noise_sigma
        scheduler.set_timesteps(steps, device=device)  # a multistep solver keeps state along one trajectory
        for t in scheduler.timesteps:
            x = _guided_step(stack, scheduler, x, t, both, added, guidance, gens)
        out[rows] = x.float().cpu()
        bar.update(len(rows))
    bar.close()
    return Candidates(out.view(len(prompts), n_per_prompt, *out.shape[1:]), seeds)


@torch.inference_mode()
def regenerate_region(
    stack: DiffusionStack,
    latents: torch.Tensor,
    prompts: Sequence[str],
    masks: torch.Tensor,
    *,
    strength: float,
    seeds: torch.Tensor,
    sampler: str | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> torch.Tensor:
    """Re-noise the masked region of clean latents [B, C, H, W] and let the UNet redraw it.

    SDEdit inside a mask: each latent is noised to the sampler step that ``strength`` (in (0, 1])
    of the way from clean starts at, then denoised with the prompt; after every step the region
    outside ``masks`` [B, 1, H, W] (1 = redraw) is put back to the original noised to the next
    step's level with the same noise, and to the original itself after the last. Row b uses
    ``seeds[b]`` for its noise, so the result does not depend on batching.
    """
    prompts = list(prompts)
    b = len(latents)
    if len(prompts) != b or masks.shape != (b, 1, *latents.shape[2:]) or tuple(seeds.shape) != (b,):
        raise ValueError(
            f"need one prompt, one [1, H, W] mask and one seed per latent: got {len(prompts)} prompts, "
            f"masks {tuple(masks.shape)}, seeds {tuple(seeds.shape)} for latents {tuple(latents.shape)}"
        )
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    scheduler, steps, guidance = _sampler(stack, sampler, num_inference_steps, guidance_scale)
    kept = int(round(steps * strength))
    if kept < 1:
        raise ValueError(f"strength {strength} of {steps} sampler steps leaves no step to run; raise one of them")
    timesteps = scheduler.timesteps[steps - kept :]
    device, dtype = stack.device, stack.dtype
    cond = stack.encode_prompts(prompts).to(device, dtype)
    uncond = unconditional_embeds(stack, cond).to(device, dtype)
    height, width = latents.shape[-2:]
    out = torch.empty(latents.shape, dtype=torch.float32)

    bar = tqdm(total=b, desc="redraw regions", unit="latent", disable=not progress)
    for start in range(0, b, batch_size):
        rows = torch.arange(start, min(start + batch_size, b))
        gens = [torch.Generator(device).manual_seed(int(s)) for s in seeds[rows].tolist()]
        clean = latents[rows].to(device, dtype)
        mask = masks[rows].to(device, dtype)
        both = PromptEmbeds.cat([uncond.repeat_each(len(rows)), cond.index(rows)])
        added = stack.added_cond_kwargs(both, height, width)
        noise = randn_tensor(clean.shape, generator=gens, device=device, dtype=dtype)
        x = scheduler.add_noise(clean, noise, timesteps[:1].repeat(len(rows)))
        scheduler.set_timesteps(steps, device=device)  # a multistep solver keeps state along one trajectory
        for i, t in enumerate(timesteps):
            x = _guided_step(stack, scheduler, x, t, both, added, guidance, gens)
            known = (
                clean
                if i + 1 == len(timesteps)
                else scheduler.add_noise(clean, noise, timesteps[i + 1 : i + 2].repeat(len(rows)))
            )
            x = mask * x + (1 - mask) * known
        out[rows] = x.float().cpu()
        bar.update(len(rows))
    bar.close()
    return out
