"""What every part of a SAIL run shares: the config sections and values its stages read (never the whole
config: only the loop holds that), the model stack, the ranks, the run folder, the log and the world it runs
in. Stages take this and nothing else from the loop."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from diffusers import UNet2DConditionModel

from ..diffusion.images import decode_latents, enlarge
from ..diffusion.stack import DiffusionStack
from ..runs.config import DataConfig, ModelConfig, SailConfig
from ..runs.distributed import DistInfo
from ..runs.layout import RunLayout
from .world import World


@dataclass
class RunContext:
    sail: SailConfig  # this round's (sail.round_overrides applied by the loop)
    data: DataConfig  # resolution, encode batch and cache of RealAlign's real images
    model: ModelConfig  # what RealAlign's encoded real images were encoded with (their cache key)
    beta: float  # train.beta: the implicit reward's scale
    seed: int
    round_sails: tuple[SailConfig, ...]  # every round's sail section (index r - 1)
    stack: DiffusionStack
    base: UNet2DConditionModel  # the frozen base model (the implicit reward's default reference)
    dist: DistInfo
    device: torch.device
    out: Path
    world: World
    log: Callable[[str], None]
    progress: bool

    @property
    def sampling(self) -> dict:
        return self.sail.sampling()

    @property
    def layout(self) -> RunLayout:
        """Every path in the run folder."""
        return RunLayout(self.out, self.sail.iter0_from)

    def stack_with(self, unet) -> DiffusionStack:
        """The stack sampling with ``unet`` (compiled when ``sail.compile``)."""
        return dataclasses.replace(self.stack, unet=torch.compile(unet) if self.sail.compile else unet)

    def global_position(self, i: int) -> int:
        """The round-wide position of this rank's i-th item (items are dealt round-robin)."""
        return self.dist.rank + i * self.dist.world_size

    def pictures(self, latents: torch.Tensor) -> list | None:
        """PIL images of latents [B, C, H, W], enlarged to at least 64 px; None without a decoder."""
        if self.stack.vae is None and self.stack.latent_channels not in (1, 3):
            return None  # a latent-space model loaded without its VAE: nothing to look at
        return enlarge(decode_latents(latents, self.stack.vae))

    def gather_in_order(self, *parts):
        """Every rank's ``parts`` and the permutation that puts their concatenation back into round
        order (rank k holds items k, k + W, ...), so training sees the same data whatever the rank count."""
        gathered = self.dist.gather(parts)  # tensors as tensors; only the prompt strings are pickled
        world = self.dist.world_size
        order = torch.tensor([k + i * world for k, g in enumerate(gathered) for i in range(len(g[0]))]).argsort()
        return gathered, order
