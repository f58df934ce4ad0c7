"""``sail-fast generate``: PNGs from a pipeline directory, a trained UNet or LoRA, or a finished run;
and ``sail-fast export``: a run's policy as a plain diffusers UNet or LoRA folder."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from ..diffusion.build import build_stack
from ..diffusion.images import decode_latents, enlarge, image_grid, is_finite
from ..diffusion.lora import LORA_WEIGHTS, POLICY, has_adapter, merged_unet
from ..diffusion.prompts import read_prompts
from ..diffusion.sampling import DEFAULTS, candidate_seeds, generate_candidates
from ..diffusion.stack import DiffusionStack, load_stack
from ..runs.config import RunConfig
from ..runs.layout import RunLayout
from ..runs.output_folder import OutputFolder
from ..runs.readback import check_run_weights, run_root
from ..runs.run_folder import load_recorded_config, read_json


def _kept_stage(run: Path) -> str | None:
    """The stage a finished run keeps (``chosen.json``: ``sail.select``, ``sail.soup``), or None when the run names
    none (a run still going, or one from before the choice). The file is read back untrusted: only a stage name
    is taken from it, and the path is the layout's."""
    layout = RunLayout(run)
    if not layout.chosen.is_file():
        return None
    stage = read_json(layout.chosen).get("stage")
    if not isinstance(stage, str) or not RunLayout.is_stage(stage):
        raise ValueError(
            f"{layout.chosen}: 'stage' must name a stage of the run (base, iter0, round-01, soup-00-02, ...), got "
            f"{stage!r}; pass the weights folder itself (e.g. RUN/round-01/train/final/unet) instead"
        )
    return stage


def _final_unet(run: Path) -> Path | None:
    """The policy a run keeps: the stage its ``chosen.json`` names (None: the base model), else its newest
    trained policy. A UNet directory, or a LoRA folder for a ``train.lora`` run (a soup is a whole UNet)."""
    kept = _kept_stage(run)
    if kept == RunLayout.BASE:
        return None
    finals = RunLayout(run).finals() if kept is None else [RunLayout(run).stage_final(kept)]
    for final in finals:
        if (final / "unet" / "config.json").is_file():
            return final / "unet"
        if (final / "lora" / LORA_WEIGHTS).is_file():
            return final / "lora"
    if kept is not None:
        raise FileNotFoundError(
            f"{run}/chosen.json keeps {kept}, but {finals[0]} holds no UNet or LoRA; "
            "pass another stage's weights folder, or resume the run"
        )
    raise FileNotFoundError(
        f"{run} holds no trained UNet or LoRA yet (looked for round-*/train/final/{{unet,lora}}, "
        "iter0/final/{unet,lora}, final/{unet,lora})"
    )


def _weights_dir(path: Path) -> Path | None:
    """The UNet directory or LoRA folder ``path`` names: itself, or the policy a run keeps (None: its base)."""
    return path if (path / "config.json").is_file() or (path / LORA_WEIGHTS).is_file() else _final_unet(path)


def check_checkpoint(checkpoint: str | Path) -> tuple[Path, RunConfig] | None:
    """The weights folder ``checkpoint`` names and its run's config, checked (the weights against their
    manifest) without loading a model, so a command checks all its checkpoints before sampling any. None for a
    diffusers pipeline directory, which carries no record to check."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {str(path)!r} is not a directory")
    if (path / "model_index.json").is_file():
        return None
    run = run_root(path)
    if run is None:
        raise FileNotFoundError(
            f"{path} is neither a diffusers pipeline directory (model_index.json) nor inside a sail-fast run "
            "(no config.yaml here or above)"
        )
    weights = _weights_dir(path)
    if weights is not None:  # None: the run keeps its base model, which the config names
        check_run_weights(weights)
    return weights, load_recorded_config(run, code="drop")  # only the model and sampler are read: no code runs


def resolve_checkpoint(checkpoint: str | Path) -> tuple[DiffusionStack, dict]:
    """The stack to sample from, and the sampling settings its run used (empty when unknown).

    ``checkpoint`` is a diffusers pipeline directory (model_index.json), a UNet directory or a LoRA
    folder (``pytorch_lora_weights.safetensors``) written by a run (its run's config.yaml supplies the
    rest of the stack), or a run directory (the stage it keeps, chosen.json; else its newest trained UNet or LoRA).
    """
    checked = check_checkpoint(checkpoint)
    if checked is None:
        path = Path(checkpoint)
        return load_stack(path, with_vae=(path / "vae").is_dir()), {}
    weights, config = checked
    stack = build_stack(config.model, seed=config.seed)
    sampling = config.sail.sampling() if config.sail is not None else {}
    if weights is None:
        return stack, sampling
    if (weights / LORA_WEIGHTS).is_file():
        # The base UNet with the adapter loaded by diffusers itself, as a user's pipeline would.
        unet = stack.unet
        unet.load_lora_adapter(weights, prefix="unet", adapter_name=POLICY, weight_name=LORA_WEIGHTS)
        unet.eval()
    else:
        unet = UNet2DConditionModel.from_pretrained(weights, torch_dtype=stack.dtype).to(stack.device).eval()
    return dataclasses.replace(stack, unet=unet), sampling


def export_unet(checkpoint: str | Path, out: str | Path, *, merge: bool = False) -> Path:
    """Write a checkpoint's policy where a plain diffusers user can load it: a LoRA folder as it is, or with
    ``merge`` (and for full fine-tuning) a whole UNet directory with the adapter merged into its weights."""
    import shutil

    folder = OutputFolder(out, "export", what="the export folder")
    stack, _ = resolve_checkpoint(checkpoint)
    lora = has_adapter(stack.unet)
    if lora and not merge:
        with folder.write(LORA_WEIGHTS) as tmp:
            shutil.copy(_weights_dir(Path(checkpoint)) / LORA_WEIGHTS, tmp)
        return folder.path
    unet = merged_unet(stack.unet) if lora else stack.unet
    with folder.write_tree() as staging:
        unet.save_pretrained(staging)
    return folder.path


def check_steps(steps: int | None) -> None:
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be >= 1 (sampler steps per picture), got {steps}")


def sampling_settings(stack: DiffusionStack, run_sampling: dict, sampler=None, steps=None, guidance_scale=None) -> dict:
    """Concrete sampler, steps and CFG: explicit values, else the run's, else the paper's for the model kind."""
    check_steps(steps)
    default_sampler, default_steps, default_cfg = DEFAULTS[stack.kind]
    picked = {"sampler": default_sampler, "num_inference_steps": default_steps, "guidance_scale": default_cfg}
    picked |= {k: v for k, v in run_sampling.items() if v is not None}
    overrides = {"sampler": sampler, "num_inference_steps": steps, "guidance_scale": guidance_scale}
    return picked | {k: v for k, v in overrides.items() if v is not None}


def check_picturable(stack: DiffusionStack, checkpoint) -> None:
    if stack.vae is None and stack.latent_channels not in (1, 3):
        raise ValueError(
            f"{checkpoint}: this stack has no VAE, so its {stack.latent_channels}-channel latents cannot be "
            "written as pictures; load it with its vae/ directory"
        )


def sample_pictures(
    stack: DiffusionStack,
    prompts: list[str],
    num_images: int,
    sampling: dict,
    *,
    seeds: torch.Tensor,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[list[Image.Image], torch.Tensor]:
    """``num_images`` pictures per prompt, prompt-major (``seeds`` [P, num_images] fixes each one's noise),
    and which of them are finite ([P * num_images] bool; the others are drawn as a NaN marker)."""
    latents = generate_candidates(
        stack, prompts, num_images, seeds=seeds, batch_size=batch_size, progress=progress, **sampling
    ).latents.flatten(0, 1)
    return decode_latents(latents, stack.vae), is_finite(latents)


def generate_to_dir(
    checkpoint,
    prompts_file,
    num_images: int,
    out_dir,
    *,
    seed: int = 0,
    sampler=None,
    steps=None,
    guidance_scale=None,
    batch_size: int = 64,
    compile: bool = False,
) -> int:
    """Write ``num_images`` PNGs per prompt (``PPPP-NN.png``), ``prompts.json`` and ``grid.png``; returns the count.
    ``compile`` samples with a ``torch.compile``'d UNet."""
    if num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {num_images}")
    check_steps(steps)
    out = OutputFolder(out_dir, "generate")  # first: a folder it may not fill fails in seconds
    stack, run_sampling = resolve_checkpoint(checkpoint)
    if compile:
        stack = dataclasses.replace(stack, unet=torch.compile(stack.unet))
    check_picturable(stack, checkpoint)
    prompts = read_prompts(prompts_file)
    sampling = sampling_settings(stack, run_sampling, sampler, steps, guidance_scale)
    images, finite = sample_pictures(
        stack,
        prompts,
        num_images,
        sampling,
        seeds=candidate_seeds(seed, len(prompts), num_images),
        batch_size=batch_size,
    )
    if not finite.all():
        print(f"WARNING: {int((~finite).sum())} of {len(images)} pictures hold NaN or inf (drawn as a red NaN marker)")
    for i, image in enumerate(images):
        with out.write(f"{i // num_images:04d}-{i % num_images:02d}.png") as tmp:
            image.save(tmp)
    record = {"checkpoint": str(checkpoint), "seed": seed, "sampling": sampling, "prompts": prompts}
    out.write_text("prompts.json", json.dumps(record, indent=2) + "\n")
    shown = num_images * min(len(prompts), 16)
    captions = [f"{prompts[i // num_images]} #{i % num_images}" for i in range(shown)]
    with out.write("grid.png") as tmp:
        image_grid(enlarge(images[:shown]), columns=num_images, captions=captions).save(tmp)
    return len(images)
