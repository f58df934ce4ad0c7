"""Candidate generation: a diffusers pipeline per prompt that decodes to PIL and re-encodes
with the VAE for training (naive), against batched latent generation (fast).

Both sample 4 prompts x 8 candidates with the same UNet, sampler, CFG and step count
(10 DDPM steps here, to keep a CPU run short; the per-step work is what differs).
fast-compiled is the fast path with a torch.compile'd UNet (sail.compile, generate --compile);
its warm-up round includes the compilation.
"""

import dataclasses

import numpy as np
import pytest
import torch
from bench_utils import sync
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
from transformers import CLIPTextConfig, CLIPTextModel

from sail_fast.diffusion.architectures import TEXT_SHAPES, UNET_CONFIGS, build_unet
from sail_fast.diffusion.sampling import generate_candidates
from sail_fast.diffusion.stack import DiffusionStack
from sail_fast.diffusion.tiny import tiny_stack

PROMPTS = ["a red bicycle", "a handwritten 7", "a cat on a sofa", "a mountain lake"]
N, STEPS = 8, 10


@pytest.fixture(scope="module")
def stack(arch, device):
    if arch == "sdxl":
        pytest.skip("the generation benchmark builds SD1.5-layout stacks")
    tokenizer = tiny_stack("sd15").tokenizer  # a real CLIP tokenizer over a small vocab
    _, width, _ = TEXT_SHAPES[arch]
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=2,
            num_attention_heads=8,
            max_position_embeddings=77,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    channels = (128, 256, 512, 512) if arch == "sd15" else (32, 64, 128, 128)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        norm_num_groups=32,
    )
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    s = DiffusionStack("sd15", build_unet(arch), scheduler, tokenizer, text.eval(), vae=vae.eval())
    for part in (s.unet, s.text_encoder, s.vae):
        part.to(device).eval()
    assert s.sample_size == UNET_CONFIGS[arch]["sample_size"]
    return s


@torch.inference_mode()
def naive_generate(stack):
    pipe = StableDiffusionPipeline(
        vae=stack.vae,
        text_encoder=stack.text_encoder,
        tokenizer=stack.tokenizer,
        unet=stack.unet,
        scheduler=DDPMScheduler.from_config(stack.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    latents = []
    for i, prompt in enumerate(PROMPTS):
        gens = [torch.Generator().manual_seed(i * N + n) for n in range(N)]
        images = pipe(
            prompt,
            num_images_per_prompt=N,
            num_inference_steps=STEPS,
            guidance_scale=7.5,
            generator=gens,
            output_type="pil",
        ).images
        # ... and back to latents for training, as a pipeline-based loop must.
        pixels = torch.stack([torch.from_numpy(np.asarray(im)).permute(2, 0, 1) for im in images]).float() / 127.5 - 1
        dist = stack.vae.encode(pixels.to(stack.device)).latent_dist
        latents.append(dist.sample() * stack.vae.config.scaling_factor)
    return torch.stack(latents)


@pytest.mark.parametrize("variant", ["naive", "fast", "fast-compiled"])
def test_generation(benchmark, stack, device, variant):
    benchmark.group = f"candidate generation {len(PROMPTS)}x{N}, {STEPS} steps"
    sampling_stack = dataclasses.replace(stack, unet=torch.compile(stack.unet)) if variant == "fast-compiled" else stack

    def run():
        if variant == "naive":
            out = naive_generate(stack)
        else:
            out = generate_candidates(
                sampling_stack,
                PROMPTS,
                N,
                sampler="ddpm",
                num_inference_steps=STEPS,
                guidance_scale=7.5,
                batch_size=len(PROMPTS) * N,
                progress=False,
            ).latents
        sync(device)
        return out

    latents = benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=1)
    assert latents.shape[:2] == (len(PROMPTS), N)
    benchmark.extra_info["latents_per_s"] = len(PROMPTS) * N / benchmark.stats.stats.median
