"""Who this process is: rank and world size under the DeepSpeed launcher, or a single process."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean of each value over ranks (every rank gets the same numbers)."""
        if not self.enabled or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return {k: v / self.world_size for k, v in zip(keys, t.tolist())}

    def gather_objects(self, obj):
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def init_distributed() -> DistInfo:
    """Join the process group when a launcher started several ranks (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def compute_device(info: DistInfo) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def deepspeed_config(train, accumulation: int, *, ema: bool) -> dict:
    """The DeepSpeed JSON for ``train`` (a TrainConfig): its ``train.deepspeed`` file (ZeRO-2 without one) with the
    batch geometry, clipping and precision the trainer uses filled in."""
    ds = json.loads(Path(train.deepspeed).read_text()) if train.deepspeed else {"zero_optimization": {"stage": 2}}
    ds.update(
        train_micro_batch_size_per_gpu=train.micro_batch_pairs,
        gradient_accumulation_steps=accumulation,
        train_batch_size=train.pairs_per_step,
        gradient_clipping=train.max_grad_norm,
        steps_per_print=10**9,
    )
    ds["bf16"] = {"enabled": train.mixed_precision == "bf16"}
    ds["fp16"] = {"enabled": train.mixed_precision == "fp16"}
    if ema and ds.get("zero_optimization", {}).get("stage", 0) == 3:
        raise ValueError("train.ema_decay is not supported with ZeRO stage 3 (parameters are partitioned)")
    return ds
