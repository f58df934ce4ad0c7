"""The memory planner against a real training run: ``sail-fast plan``'s prediction for a shipped
config (full fine-tuning and LoRA) beside the peak the allocator saw over a few DPO steps.

    python bench/plan_check.py --config configs/sdxl.yaml --out plan_check.json   # on a GPU

On CUDA the measure is ``torch.cuda.max_memory_allocated``; on a CPU (the rehearsal) the process's
peak resident size over its size before the models were built, which also counts allocator slack.
Each setting runs in a fresh process, so one cannot hide another's peak.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch


def measure(config_path: str, lora: bool, steps: int = 2) -> dict:
    import tempfile

    from train_step_variants import _status_bytes, synthetic_pairs

    from sail_fast.commands.plan import GIB, latent_size, plan_memory
    from sail_fast.diffusion.architectures import UNET_CONFIGS, build_unet
    from sail_fast.diffusion.build import build_stack
    from sail_fast.dpo.builder import trainer_for
    from sail_fast.runs.config import load_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        extra = [
            f"output_dir={tmp}",
            "train.deepspeed=null",
            "train.progress=false",
            f"train.pairs_per_step={load_config(config_path).train.micro_batch_pairs}",
        ]
        config = load_config(config_path, extra + (["train.lora.rank=8"] if lora else []))
        train = config.train
        kind = config.model.kind or ("sdxl" if "sdxl" in config_path else "sd15")
        if config.model.toy or config.model.tiny:  # the rehearsal: the config's own small stack
            stack = build_stack(config.model)
            unet, scheduler = stack.unet, stack.scheduler
            pairs = synthetic_pairs("sd15-small", 16)
            side, channels = latent_size(config.model, config.data.resolution), unet.config.in_channels
            enc = stack.encode_prompts(["a prompt", ""])
            pairs.win, pairs.lose = (torch.randn(16, channels, side, side) for _ in range(2))
            pairs.prompt_embeds = enc.prompt_embeds
        else:  # random weights in the real architecture: no download
            from diffusers import DDPMScheduler

            if device.type == "cpu":
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            unet, scheduler = build_unet(kind, device=device), DDPMScheduler(beta_schedule="scaled_linear")
            pairs = synthetic_pairs(kind, 16)
            assert UNET_CONFIGS[kind]["sample_size"] == latent_size(config.model, config.data.resolution)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() - sum(p.numel() * p.element_size() for p in unet.parameters())
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = _status_bytes("VmRSS") - sum(p.numel() * p.element_size() for p in unet.parameters())
        trainer = trainer_for(config, unet, scheduler, pairs, device=device)
        for _ in range(steps):
            trainer.train_step()
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _status_bytes("VmHWM")
        plan = plan_memory(
            config.model,
            1,
            zero_stage=0,
            optimizer=train.optimizer,
            mixed_precision=train.mixed_precision,
            checkpointing=train.gradient_checkpointing,
            micro_batch_pairs=train.micro_batch_pairs,
            latent=latent_size(config.model, config.data.resolution),
            lora=train.lora,
        )
    measured = peak - base
    return {
        "config": config_path,
        "trains": "LoRA r8" if lora else "UNet",
        "device": device.type,
        "planned_gib": plan.total / GIB,
        "measured_gib": measured / GIB,
        "planned_over_measured": plan.total / measured,
        "plan": {k: v / GIB for k, v in vars(plan).items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/sdxl.yaml")
    parser.add_argument("--out", required=True)
    parser.add_argument("--one", choices=["full", "lora"], help=argparse.SUPPRESS)  # the per-setting child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.config, args.one == "lora")))
        return
    results = []
    for setting in ("full", "lora"):
        done = subprocess.run(
            [sys.executable, __file__, "--config", args.config, "--out", args.out, "--one", setting],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise SystemExit(f"plan check ({setting}) failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    for r in results:
        print(
            f"{r['trains']:8s} planned {r['planned_gib']:.2f} GiB, measured {r['measured_gib']:.2f} GiB "
            f"({r['planned_over_measured']:.2f}x) on {r['device']}"
        )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
