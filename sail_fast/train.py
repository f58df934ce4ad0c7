"""Diffusion-DPO training entry point.

    python sail_fast/train.py --config configs/X.yaml [--set key=value ...] [--resume]
    deepspeed sail_fast/train.py --config configs/X.yaml        # several ranks, ZeRO
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's directory heads sys.path, which would make config.py,
# data.py, models.py... importable as top-level modules and shadow same-named packages.
_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]

import argparse  # noqa: E402

import torch  # noqa: E402

from sail_fast.config import ModelConfig, RunConfig, dump_config, load_config  # noqa: E402
from sail_fast.distributed import compute_device, init_distributed  # noqa: E402
from sail_fast.models import DiffusionStack, load_stack, tiny_stack  # noqa: E402
from sail_fast.pair_sources import load_pairs  # noqa: E402
from sail_fast.trainer import DPOTrainer  # noqa: E402


def build_stack(model: ModelConfig, *, seed: int, device: torch.device) -> DiffusionStack:
    if model.tiny is not None:
        stack = tiny_stack(model.tiny, seed=seed, sample_size=model.tiny_sample_size,
                           in_channels=model.tiny_in_channels, with_vae=model.with_vae)
    else:
        stack = load_stack(model.path, kind=model.kind, with_vae=model.with_vae)
    for part in (stack.unet, stack.text_encoder, stack.text_encoder_2, stack.vae):
        if part is not None:
            part.to(device)
    return stack


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Diffusion-DPO training (one SAIL stage)")
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.steps=10 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return parser.parse_args(argv)


def run_training(config: RunConfig, *, resume: bool = False) -> Path:
    dist = init_distributed()
    device = compute_device(dist)
    out = Path(config.output_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(config, out / "config.yaml")
    stack = build_stack(config.model, seed=config.seed, device=device)
    pairs = load_pairs(config.data.seed_pairs, stack, model=config.model, data=config.data,
                       cache_dir=config.data.cache_dir or out / "cache", seed=config.seed, dist=dist,
                       log=print if dist.is_main else (lambda *_: None))
    trainer = DPOTrainer(config, stack.unet, stack.scheduler, pairs, dist=dist, device=device)
    trainer.train(resume=resume)
    return out / "final"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_training(load_config(args.config, args.set), resume=args.resume)


if __name__ == "__main__":
    main()
