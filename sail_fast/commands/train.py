"""``sail-fast train`` and ``python sail_fast/train.py``: the SAIL loop when the config has a ``sail:`` section,
else one Diffusion-DPO stage on the config's pairs, in ``output_dir`` (locked while it runs)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from ..data.sources import load_pairs
from ..diffusion.build import build_stack, check_model_available
from ..dpo.builder import trainer_for
from ..runs.config import RunConfig, load_config
from ..runs.distributed import compute_device, init_distributed
from ..runs.layout import RunLayout, TrainingLayout
from ..runs.output_folder import writable_folder
from ..runs.run_folder import RunLock, record_config
from .arguments import add_run_arguments, user_errors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="SAIL (configs with a sail: section) or one Diffusion-DPO stage")
    add_run_arguments(parser)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return parser.parse_args(argv)


def run_training(config: RunConfig, *, resume: bool = False, allow_config_change: bool = False) -> Path:
    """One Diffusion-DPO stage on ``data.seed_pairs``, in ``output_dir`` (locked while it runs)."""
    check_model_available(config.model)
    dist = init_distributed()
    out = writable_folder(config.output_dir, "output_dir")  # a path mistake ends here, before any work
    with RunLock(out, log=print) if dist.is_main else contextlib.nullcontext():
        record_config(
            out,
            config.model_dump(mode="json"),
            resume=resume,
            allow_change=allow_config_change,
            log=print,
            write=dist.is_main,
        )
        return _train_stage(config, dist, resume)


def _train_stage(config: RunConfig, dist, resume: bool) -> Path:
    device = compute_device(dist)
    out = Path(config.output_dir)
    stack = build_stack(config.model, seed=config.seed, device=device)
    pairs = load_pairs(
        config.data.seed_pairs,
        stack,
        model=config.model,
        data=config.data,
        cache_dir=config.data.cache_dir or RunLayout(out).cache,
        seed=config.seed,
        dist=dist,
        log=print if dist.is_main else (lambda *_: None),
    )
    trainer_for(config, stack.unet, stack.scheduler, pairs, dist=dist, device=device).train(resume=resume)
    return TrainingLayout(out).final


def run_sail(config: RunConfig, *, resume: bool = False, allow_config_change: bool = False) -> Path:
    from ..sail.loop import SailLoop

    dist = init_distributed()
    return SailLoop(config, dist=dist, device=compute_device(dist)).run(
        resume=resume, allow_config_change=allow_config_change
    )


def main(argv: list[str] | None = None) -> None:
    """A config with a sail: section runs the whole SAIL loop; without one, one DPO stage."""
    args = parse_args(argv)
    command = [Path(sys.executable).name, "sail_fast/train.py", *(sys.argv[1:] if argv is None else argv)]
    with user_errors("train.py", resume_command=[w for w in command if not w.startswith("--local_rank")]):
        config = load_config(args.config, args.set)
        (run_sail if config.sail is not None else run_training)(
            config, resume=args.resume, allow_config_change=args.allow_config_change
        )
