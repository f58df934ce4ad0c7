"""The mixup sampler: every batch holds a fixed share of generated pairs, the rest seed pairs."""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

# ----------------------------------------------------------------------------- mixup sampling


class _Stream:
    """Endless shuffled walk over range(n): a fresh permutation each time one is used up."""

    def __init__(self, n: int, seed: int, stream_id: int):
        self.n = n
        seq_seed = int(np.random.SeedSequence([seed, stream_id]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
        self.generator = torch.Generator().manual_seed(seq_seed)
        self.perm = torch.randperm(n, generator=self.generator) if n else torch.empty(0, dtype=torch.int64)
        self.pos = 0

    def take(self, k: int) -> torch.Tensor:
        parts = []
        while k > 0:
            if self.pos == self.n:
                self.perm = torch.randperm(self.n, generator=self.generator)
                self.pos = 0
            step = min(k, self.n - self.pos)
            parts.append(self.perm[self.pos : self.pos + step])
            self.pos += step
            k -= step
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def state(self) -> dict:
        return {"n": self.n, "perm": self.perm.clone(), "pos": self.pos, "generator": self.generator.get_state()}

    def load(self, state: dict, name: str) -> None:
        if int(state["n"]) != self.n:
            raise ValueError(f"state has {state['n']} {name} pairs, this sampler {self.n}")
        self.perm = state["perm"].clone().to(torch.int64)
        self.pos = int(state["pos"])
        self.generator.set_state(state["generator"].clone())


class MixupSampler:
    """Batches of pair indices with exactly round(alpha * batch_size) generated pairs and
    the rest from the seed pairs, every batch.

    Indices address ``LatentPairs.cat([generated, seed])``: generated pairs are
    0..num_generated-1, seed pairs follow. Each source is walked in its own shuffled
    order, so every pair of a source is used before any repeats. alpha * batch_size is
    rounded half up.
    """

    def __init__(self, num_generated: int, num_seed: int, batch_size: int, alpha: float = 0.25, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= alpha <= 1.0:  # also rejects NaN
            raise ValueError(f"alpha (the generated share of each batch) must be in [0, 1], got {alpha}")
        if num_generated < 0 or num_seed < 0:
            raise ValueError(f"num_generated and num_seed must be >= 0, got {num_generated} and {num_seed}")
        if alpha == 1.0 and num_generated == 0:
            raise ValueError(
                "alpha=1 takes every pair from the generated pairs, but num_generated=0; "
                "lower alpha or generate pairs first"
            )
        n_gen = 0 if num_generated == 0 else int(math.floor(alpha * batch_size + 0.5))
        n_seed = batch_size - n_gen
        if n_seed > 0 and num_seed == 0:
            raise ValueError(
                f"alpha={alpha} of batch_size={batch_size} needs {n_seed} seed pairs per batch, but num_seed=0; "
                "pass the seed pairs, or set alpha=1 to train on generated pairs only"
            )
        self.num_generated, self.num_seed = num_generated, num_seed
        self.batch_size, self.alpha, self.seed = batch_size, alpha, seed
        self._n_gen, self._n_seed = n_gen, n_seed
        self._generated = _Stream(num_generated, seed, 0)
        self._seed = _Stream(num_seed, seed, 1)

    def counts(self) -> tuple[int, int]:
        """(generated, seed) pairs per batch."""
        return self._n_gen, self._n_seed

    def describe(self) -> str:
        return (
            f"mixup: {self._n_gen} generated + {self._n_seed} seed pairs per batch "
            f"(alpha={self.alpha:g} of {self.batch_size})"
        )

    def next_batch(self) -> torch.Tensor:
        """[batch_size] int64 indices, generated ones first."""
        return torch.cat([self._generated.take(self._n_gen), self._seed.take(self._n_seed) + self.num_generated])

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {
            "num_generated": self.num_generated,
            "num_seed": self.num_seed,
            "batch_size": self.batch_size,
            "counts": list(self.counts()),
            "generated": self._generated.state(),
            "seed": self._seed.state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume exactly: the following batches equal those of the uninterrupted sampler."""
        mine = (self.num_generated, self.num_seed, self.batch_size, list(self.counts()))
        theirs = (state["num_generated"], state["num_seed"], state["batch_size"], list(state["counts"]))
        if mine != theirs:
            raise ValueError(
                "sampler state is for (num_generated, num_seed, batch_size, counts) = "
                f"{theirs}, this sampler has {mine}; build it with the same arguments"
            )
        self._generated.load(state["generated"], "generated")
        self._seed.load(state["seed"], "seed")
