"""The DPO training step: pairs/s and peak memory, naive against fast (see train_step_variants)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bench_utils import sync
from train_step_variants import PAIRS, VARIANTS, make_step

from sail_fast.diffusion.architectures import build_unet
from sail_fast.dpo.optim import build_optimizer
from sail_fast.runs.config import TrainConfig


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_step_throughput(benchmark, arch, device, variant, tmp_path):
    benchmark.group = f"DPO train step, {PAIRS} pairs"
    step = make_step(variant, arch, device, str(tmp_path))

    def timed():
        loss = step()
        sync(device)
        return loss

    loss = benchmark.pedantic(timed, rounds=5, iterations=1, warmup_rounds=2)  # warm-up includes compilation
    assert torch.isfinite(torch.as_tensor(loss))
    benchmark.extra_info["pairs_per_s"] = PAIRS / benchmark.stats.stats.median


# bf16 is emulated on CPUs without AMX/avx512_bf16 (minutes per probe): GPU only.
MEMORY_VARIANTS = VARIANTS if torch.cuda.is_available() else ("naive", "fast-fp32", "lora-fp32")


@pytest.mark.parametrize("variant", MEMORY_VARIANTS)
def test_train_step_peak_memory(benchmark, arch, variant):
    # A fresh process per variant, so one variant's allocations cannot hide another's peak.
    benchmark.group = "DPO train step peak memory (timing is the probe process, ignore it)"
    script = Path(__file__).with_name("train_step_variants.py")

    def probe():
        out = subprocess.run([sys.executable, str(script), variant, arch], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    result = benchmark.pedantic(probe, rounds=1, iterations=1)
    benchmark.extra_info.update(result)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_optimizer_step(benchmark, arch, device, optimizer):
    # The optimizer's share of a training step: one step over the UNet's parameters with fixed
    # gradients (bitsandbytes' 8-bit AdamW is a fused kernel on GPUs, plain torch ops on CPUs).
    benchmark.group = "optimizer step over the UNet's parameters"
    unet = build_unet(arch, device=device)
    for p in unet.parameters():
        p.grad = torch.randn_like(p)
    opt = build_optimizer(optimizer, unet.parameters(), TrainConfig(learning_rate=1e-5))

    def timed():
        opt.step()
        sync(device)

    benchmark.pedantic(timed, rounds=5, iterations=1, warmup_rounds=1)  # warm-up allocates the states
    benchmark.extra_info["parameters"] = sum(p.numel() for p in unet.parameters())
