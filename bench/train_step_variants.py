"""The DPO training step, naive and fast, shared by the throughput benchmark and the
peak-memory probe (run as a script so each variant gets a fresh process).

naive: fp32 policy and reference, elementwise MSE and loss written out, fp32 AdamW, eager.
fast:  DPOTrainer: fused paired_mse, reference without autograd in the compute dtype,
       bitsandbytes 8-bit AdamW, torch.compile (unfused on CPU, see trainer.CPU_COMPILE_OPTIONS);
       in fp32 or with bf16 autocast.
lora:  fast-fp32 training a rank-8 LoRA adapter (peft) on the attention projections; the reference
       is the same UNet with its adapter off, so there is no second UNet.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from sail_fast.data.latent_pairs import LatentPairs
from sail_fast.diffusion.architectures import TEXT_SHAPES, UNET_CONFIGS, build_unet
from sail_fast.dpo.builder import trainer_for
from sail_fast.runs.config import load_config

PAIRS, BETA = 4, 5000.0
VARIANTS = ("naive", "fast-fp32", "fast-bf16", "lora-fp32")


def _scheduler():
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def synthetic_pairs(arch: str, m: int) -> LatentPairs:
    side = UNET_CONFIGS[arch]["sample_size"]
    tokens, width, pooled = TEXT_SHAPES[arch]
    gen = torch.Generator().manual_seed(0)
    time_ids = torch.tensor([side * 8, side * 8, 0, 0, side * 8, side * 8], dtype=torch.float32).repeat(m, 1)
    return LatentPairs(
        torch.randn(m, 4, side, side, generator=gen),
        torch.randn(m, 4, side, side, generator=gen),
        torch.zeros(m, dtype=torch.int64),
        ["a prompt", ""],
        torch.randn(2, tokens, width, generator=gen),
        None if pooled is None else torch.randn(2, pooled, generator=gen),
        None if pooled is None else time_ids,
        None if pooled is None else time_ids.clone(),
        torch.ones(m),
        ["human"] * m,
    )


class NaiveStep:
    """The Diffusion-DPO step as public training scripts write it."""

    def __init__(self, arch, device):
        self.policy = build_unet(arch, device=device).train()
        self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=1e-5)
        self.scheduler, self.device = _scheduler(), device
        self.pairs, self.step_index = synthetic_pairs(arch, 64), 0

    def __call__(self):
        gen = torch.Generator().manual_seed(self.step_index)
        self.step_index += 1
        b = self.pairs.batch(torch.arange(PAIRS)).to(self.device)
        x0 = torch.cat([b.win, b.lose])
        noise = torch.randn(b.win.shape, generator=gen).to(self.device).repeat(2, 1, 1, 1)
        t = torch.randint(0, 1000, (PAIRS,), generator=gen).to(self.device).repeat(2)
        x_t = self.scheduler.add_noise(x0, noise, t)
        embeds = b.prompt_embeds.repeat(2, 1, 1)
        added = (
            None
            if b.pooled_prompt_embeds is None
            else {
                "text_embeds": b.pooled_prompt_embeds.repeat(2, 1),
                "time_ids": torch.cat([b.time_ids_win, b.time_ids_lose]),
            }
        )
        pred = self.policy(x_t, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
        with torch.no_grad():
            ref = self.reference(x_t, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
        mse = (pred - noise).pow(2).mean(dim=[1, 2, 3])
        mse_ref = (ref - noise).pow(2).mean(dim=[1, 2, 3])
        (mw, ml), (rw, rl) = mse.chunk(2), mse_ref.chunk(2)
        loss = -F.logsigmoid(-0.5 * BETA * ((mw - ml) - (rw - rl))).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def make_step(variant: str, arch: str, device: torch.device, output_dir: str):
    if variant == "naive":
        return NaiveStep(arch, device)
    precision = "bf16" if variant == "fast-bf16" else "fp32"
    lora = ["train.lora.rank=8"] if variant.startswith("lora") else []
    config = load_config(
        overrides=[
            *lora,
            "model.tiny=sd15",
            f"output_dir={output_dir}",
            "train.optimizer=adamw8bit",
            "train.compile=true",
            f"train.mixed_precision={precision}",
            f"train.pairs_per_step={PAIRS}",
            f"train.micro_batch_pairs={PAIRS}",
            "train.learning_rate=1e-5",
            "train.progress=false",
        ]
    )
    trainer = trainer_for(
        config, build_unet(arch, device=device), _scheduler(), synthetic_pairs(arch, 64), device=device
    )
    return lambda: trainer.train_step()["loss"]


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def measure_peak_memory(variant: str, arch: str, steps: int = 3) -> dict:
    """Peak memory of training (models, reference, optimizer state, activations): the
    allocator's peak on GPU; on CPU, the process's peak resident size (VmHWM, reset just
    before the models are built, after every import) over its resident size then."""
    import tempfile

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the peak resident size to the current one
        base = _status_bytes("VmRSS")
    with tempfile.TemporaryDirectory() as tmp:
        step = make_step(variant, arch, device, tmp)
        for _ in range(steps):
            step()
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _status_bytes("VmHWM")
    return {
        "variant": variant,
        "arch": arch,
        "device": device.type,
        "peak_bytes": peak,
        "base_bytes": base,
        "training_peak_bytes": peak - base,
    }


if __name__ == "__main__":
    print(json.dumps(measure_peak_memory(sys.argv[1], sys.argv[2])))
