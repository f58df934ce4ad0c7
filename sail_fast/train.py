"""Training entry point: the SAIL loop when the config has a ``sail:`` section, else one
Diffusion-DPO stage on the config's pairs.

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

from sail_fast.config import RunConfig, dump_config, load_config  # noqa: E402
from sail_fast.distributed import compute_device, init_distributed  # noqa: E402
from sail_fast.models import build_stack  # noqa: E402
from sail_fast.pair_sources import load_pairs  # noqa: E402
from sail_fast.trainer import DPOTrainer  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="SAIL (configs with a sail: section) or one Diffusion-DPO stage")
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


def run_sail(config: RunConfig, *, resume: bool = False) -> Path:
    from sail_fast.loop import SailLoop

    dist = init_distributed()
    return SailLoop(config, dist=dist, device=compute_device(dist)).run(resume=resume)


def main(argv: list[str] | None = None) -> None:
    """A config with a sail: section runs the whole SAIL loop; without one, one DPO stage."""
    args = parse_args(argv)
    config = load_config(args.config, args.set)
    (run_sail if config.sail is not None else run_training)(config, resume=args.resume)


if __name__ == "__main__":
    main()
