"""Who this process is: rank and world size under the DeepSpeed launcher, or a single process."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

_MAX_DIMS = 7  # gather_tensors' shape header: a tensor's dim count, then up to this many sizes


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
        """Every rank's ``obj``, in rank order, on every rank (pickled: for small things such as prompts)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank. Tensors travel as tensors (``gather_tensors``),
        dataclasses field by field and tuples item by item; anything else (strings, lists of them) is pickled."""
        if not self.enabled:
            return [obj]
        if isinstance(obj, torch.Tensor):
            return self.gather_tensors(obj)
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            names = [f.name for f in dataclasses.fields(obj)]
            per_field = {n: self.gather(getattr(obj, n)) for n in names}
            return [dataclasses.replace(obj, **{n: per_field[n][k] for n in names}) for k in range(self.world_size)]
        if isinstance(obj, tuple):
            per_item = [self.gather(x) for x in obj]
            return [tuple(items[k] for items in per_item) for k in range(self.world_size)]
        return self.gather_objects(obj)

    def gather_tensors(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``t``, in rank order, on every rank, bit for bit and on ``t``'s device. Ranks may hold
        different numbers of rows (dim 0, zero included); the other dims and the dtype must agree.

        The bytes travel through one ``all_gather`` padded to the longest rank (any dtype, bf16 and bool included,
        on any backend), after a small one for the shapes: no pickling, and no copy through Python objects."""
        if not self.enabled:
            return [t]
        if not 1 <= t.dim() <= _MAX_DIMS:
            raise ValueError(f"gather_tensors needs a tensor of 1 to {_MAX_DIMS} dims (rows first); got {t.dim()}")
        device = _collective_device(t.device)
        header = torch.tensor([t.dim(), *t.shape] + [0] * (_MAX_DIMS - t.dim()), dtype=torch.int64, device=device)
        headers = [torch.empty_like(header) for _ in range(self.world_size)]
        dist.all_gather(headers, header)
        shapes = [tuple(h[1 : 1 + h[0]]) for h in (h.tolist() for h in headers)]
        if any(s[1:] != tuple(t.shape[1:]) for s in shapes):
            raise ValueError(f"gather_tensors: the ranks' tensors differ beyond dim 0: {shapes}")
        row_bytes = math.prod(t.shape[1:]) * t.element_size()
        longest = max(s[0] for s in shapes) * row_bytes
        mine = t.detach().contiguous().reshape(-1).view(torch.uint8).to(device)
        padded = torch.zeros(longest, dtype=torch.uint8, device=device)
        padded[: mine.numel()] = mine
        received = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(received, padded)
        return [r[: s[0] * row_bytes].view(t.dtype).reshape(s).to(t.device) for r, s in zip(received, shapes)]


def _collective_device(device: torch.device) -> torch.device:
    """Where the process group's collectives take their tensors: the current GPU under NCCL, else ``device``."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return device


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
