"""``LatentPairs``: encoded pairs (latents, prompt embeddings, labels), the currency between stages,
saved as safetensors shards; ``PairBatch``: one training batch of them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import torch

from ..runs.readback import load_checked_tensors, save_checked_tensors
from .records import _expand_files

_FORMAT = "sail_fast.LatentPairs"
_FORMAT_VERSION = "1"  # shards written before they carried a sha256 of their contents are read unchecked
REWRITE = "write it again (LatentPairs.save), or remove it from the pair list"


# ----------------------------------------------------------------------------- cached latents


@dataclass
class PairBatch:
    """One training batch of pairs; row b of every tensor belongs to the same pair."""

    win: torch.Tensor
    lose: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None
    time_ids_win: torch.Tensor | None
    time_ids_lose: torch.Tensor | None
    label: torch.Tensor

    def __len__(self) -> int:
        return self.win.shape[0]

    def to(self, device, dtype: torch.dtype | None = None) -> "PairBatch":
        """Move to ``device``; ``dtype`` casts floating tensors except label, which stays float32."""

        def move(t):
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)

        out = {f.name: move(getattr(self, f.name)) for f in fields(self) if f.name != "label"}
        return PairBatch(**out, label=self.label.to(device=device, dtype=torch.float32))


@dataclass
class LatentPairs:
    """Pairs cached in latent space with their text conditioning; what training reads.

    win, lose: [M, C, H, W] latents (already multiplied by vae.config.scaling_factor when
        a VAE encoded them; pixels in [-1, 1] for pixel-space models), float16 or float32.
    prompt_index: [M] int64 into prompts / prompt_embeds.
    prompts: unique prompts; the LAST entry is always "" (the unconditional prompt that
        caption dropout switches to).
    prompt_embeds: [U, L, D], one row per unique prompt.
    pooled_prompt_embeds: [U, D2] for SDXL, else None.
    time_ids_win, time_ids_lose: [M, 6] SDXL micro-conditioning per image, in pixels:
        (orig_h, orig_w, crop_top, crop_left, target_h, target_w); None for SD1.5.
    label: [M] float32, probability that win is preferred.
    source: [M] where each pair came from ("human", "sail", ...).
    """

    win: torch.Tensor
    lose: torch.Tensor
    prompt_index: torch.Tensor
    prompts: list[str]
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None
    time_ids_win: torch.Tensor | None
    time_ids_lose: torch.Tensor | None
    label: torch.Tensor
    source: list[str]

    def __post_init__(self):
        self.prompts = list(self.prompts)
        self.source = list(self.source)
        m = self.win.shape[0]
        problems = []
        if self.win.dim() != 4 or self.win.shape != self.lose.shape:
            problems.append(f"win {tuple(self.win.shape)} and lose {tuple(self.lose.shape)} must both be [M, C, H, W]")
        if self.prompt_index.shape != (m,) or self.prompt_index.dtype != torch.int64:
            problems.append(
                f"prompt_index must be int64 [{m}], got {self.prompt_index.dtype} {tuple(self.prompt_index.shape)}"
            )
        if not self.prompts or self.prompts[-1] != "":
            problems.append('prompts must end with "" (the unconditional prompt)')
        elif "" in self.prompts[:-1] or len(set(self.prompts)) != len(self.prompts):
            problems.append("prompts must be unique")
        u = len(self.prompts)
        if self.prompt_embeds.dim() != 3 or self.prompt_embeds.shape[0] != u:
            problems.append(f"prompt_embeds must be [{u}, L, D] for {u} prompts, got {tuple(self.prompt_embeds.shape)}")
        pooled = self.pooled_prompt_embeds
        if pooled is not None and (pooled.dim() != 2 or pooled.shape[0] != u):
            problems.append(f"pooled_prompt_embeds must be [{u}, D2], got {tuple(pooled.shape)}")
        if (self.time_ids_win is None) != (self.time_ids_lose is None):
            problems.append("time_ids_win and time_ids_lose must both be set or both be None")
        for name in ("time_ids_win", "time_ids_lose"):
            t = getattr(self, name)
            if t is not None and t.shape != (m, 6):
                problems.append(f"{name} must be [{m}, 6], got {tuple(t.shape)}")
        if self.label.shape != (m,):
            problems.append(f"label must be [{m}], got {tuple(self.label.shape)}")
        if len(self.source) != m:
            problems.append(f"source has {len(self.source)} entries for {m} pairs")
        if m and not problems and (int(self.prompt_index.min()) < 0 or int(self.prompt_index.max()) >= u):
            problems.append(f"prompt_index out of range for {u} prompts")
        if problems:
            raise ValueError("inconsistent LatentPairs: " + "; ".join(problems))

    def __len__(self) -> int:
        return self.win.shape[0]

    @property
    def empty_prompt_index(self) -> int:
        return len(self.prompts) - 1

    @staticmethod
    def cat(items: Sequence["LatentPairs"]) -> "LatentPairs":
        """Concatenate pairs and merge their prompt tables.

        A prompt present in several items keeps the embedding of its first occurrence
        (items are expected to come from the same text encoders); "" stays last.
        """
        items = list(items)
        if not items:
            raise ValueError("LatentPairs.cat needs at least one item")
        first = items[0]
        for i, it in enumerate(items[1:], start=1):
            if it.win.shape[1:] != first.win.shape[1:]:
                raise ValueError(
                    f"item {i} has latents {tuple(it.win.shape[1:])}, item 0 has {tuple(first.win.shape[1:])}"
                )
            if it.prompt_embeds.shape[1:] != first.prompt_embeds.shape[1:]:
                raise ValueError(
                    f"item {i} has prompt embeddings {tuple(it.prompt_embeds.shape[1:])}, item 0 has "
                    f"{tuple(first.prompt_embeds.shape[1:])}: were they encoded with different stacks?"
                )
            for name in ("pooled_prompt_embeds", "time_ids_win"):
                if (getattr(it, name) is None) != (getattr(first, name) is None):
                    raise ValueError(f"cannot concatenate LatentPairs with and without {name} (SDXL and SD1.5 mixed?)")

        table: dict[str, tuple[int, int]] = {}  # prompt -> (item, row) of its first occurrence
        for i, it in enumerate(items):
            for row, p in enumerate(it.prompts[:-1]):
                table.setdefault(p, (i, row))
        prompts = list(table) + [""]
        where = list(table.values()) + [(0, first.empty_prompt_index)]
        new_row = {p: r for r, p in enumerate(prompts)}

        def gather(name):
            return torch.stack([getattr(items[i], name)[row] for i, row in where])

        index = [torch.tensor([new_row[p] for p in it.prompts], dtype=torch.int64)[it.prompt_index] for it in items]

        def cat_opt(name):
            return None if getattr(first, name) is None else torch.cat([getattr(it, name) for it in items])

        return LatentPairs(
            win=torch.cat([it.win for it in items]),
            lose=torch.cat([it.lose for it in items]),
            prompt_index=torch.cat(index),
            prompts=prompts,
            prompt_embeds=gather("prompt_embeds"),
            pooled_prompt_embeds=None if first.pooled_prompt_embeds is None else gather("pooled_prompt_embeds"),
            time_ids_win=cat_opt("time_ids_win"),
            time_ids_lose=cat_opt("time_ids_lose"),
            label=torch.cat([it.label for it in items]),
            source=[s for it in items for s in it.source],
        )

    def subset(self, idx) -> "LatentPairs":
        """The pairs at ``idx`` (indices or a bool mask), with the prompt table cut to those used."""
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        idx = idx.to(torch.int64).flatten()
        used = torch.unique(self.prompt_index[idx])
        used = used[used != self.empty_prompt_index]
        keep = torch.cat([used, torch.tensor([self.empty_prompt_index])])
        remap = torch.full((len(self.prompts),), -1, dtype=torch.int64)
        remap[keep] = torch.arange(len(keep))

        def take(t):
            return None if t is None else t[idx]

        return LatentPairs(
            win=self.win[idx],
            lose=self.lose[idx],
            prompt_index=remap[self.prompt_index[idx]],
            prompts=[self.prompts[i] for i in keep.tolist()],
            prompt_embeds=self.prompt_embeds[keep],
            pooled_prompt_embeds=None if self.pooled_prompt_embeds is None else self.pooled_prompt_embeds[keep],
            time_ids_win=take(self.time_ids_win),
            time_ids_lose=take(self.time_ids_lose),
            label=self.label[idx],
            source=[self.source[i] for i in idx.tolist()],
        )

    def hold_out(self, count: int, generator: torch.Generator) -> tuple["LatentPairs", "LatentPairs"]:
        """(the rest, ``count`` pairs drawn at random by ``generator``), each in the original order."""
        if not 0 < count < len(self):
            raise ValueError(f"cannot hold out {count} of {len(self)} pairs: leave at least one on each side")
        held = torch.zeros(len(self), dtype=torch.bool)
        held[torch.randperm(len(self), generator=generator)[:count]] = True
        return self.subset(~held), self.subset(held)

    def batch(
        self,
        idx: torch.Tensor,
        *,
        caption_dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> PairBatch:
        """Gather the pairs at ``idx`` into a PairBatch.

        With probability ``caption_dropout`` per pair (drawn from ``generator``; no draw
        at all when it is 0) the pair's conditioning becomes the "" prompt's: its token
        embeddings and, for SDXL, its pooled embedding. For SDXL that is the *encoded*
        empty string, as in diffusers' SDXL fine-tuning scripts, not the zeros the SDXL
        pipeline substitutes for an empty negative prompt at sampling time.
        """
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        idx = torch.as_tensor(idx, dtype=torch.int64).flatten()
        p_idx = self.prompt_index[idx]
        if caption_dropout > 0.0:
            drop = torch.rand(len(idx), generator=generator) < caption_dropout
            p_idx = torch.where(drop, torch.full_like(p_idx, self.empty_prompt_index), p_idx)

        def take(t):
            return None if t is None else t[idx]

        return PairBatch(
            win=self.win[idx],
            lose=self.lose[idx],
            prompt_embeds=self.prompt_embeds[p_idx],
            pooled_prompt_embeds=None if self.pooled_prompt_embeds is None else self.pooled_prompt_embeds[p_idx],
            time_ids_win=take(self.time_ids_win),
            time_ids_lose=take(self.time_ids_lose),
            label=self.label[idx].float(),
        )

    # ------------------------------------------------------------------ storage

    _TENSORS = (
        "win",
        "lose",
        "prompt_index",
        "prompt_embeds",
        "pooled_prompt_embeds",
        "time_ids_win",
        "time_ids_lose",
        "label",
    )

    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors shard: the tensors, plus prompts/sources/format in its JSON metadata.

        Sources are stored as a table of names (metadata) and a per-pair index tensor,
        which keeps the header small for a million pairs.
        """

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        names = list(dict.fromkeys(self.source))
        lookup = {s: i for i, s in enumerate(names)}
        tensors = {n: getattr(self, n) for n in self._TENSORS if getattr(self, n) is not None}
        tensors["source_index"] = torch.tensor([lookup[s] for s in self.source], dtype=torch.int64)
        # safetensors refuses tensors that share storage (e.g. win/lose sliced from one tensor).
        seen: set[int] = set()
        for name, t in tensors.items():
            t = t.detach().cpu().contiguous()
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen and t.numel():
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            tensors[name] = t
        metadata = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "prompts": json.dumps(self.prompts, ensure_ascii=False),
            "sources": json.dumps(names, ensure_ascii=False),
        }
        save_checked_tensors(tensors, path, metadata)  # with the sha256 of its contents, checked by load
        return path

    @staticmethod
    def load(paths: str | os.PathLike | Sequence[str | os.PathLike], fix: str = REWRITE) -> "LatentPairs":
        """Load a shard, a list of shards, or a directory of *.safetensors shards (concatenated). A shard whose
        contents no longer match the sha256 written with them is refused naming it, with ``fix`` (what to do)."""
        shards = [_load_shard(f, fix) for f in _expand_files(paths, ".safetensors", "LatentPairs shard")]
        return shards[0] if len(shards) == 1 else LatentPairs.cat(shards)


def _load_shard(file: Path, fix: str) -> LatentPairs:
    tensors, metadata = load_checked_tensors(file, fix)
    if metadata.get("format") != _FORMAT:
        raise ValueError(
            f"{file}: not a LatentPairs shard (metadata format {metadata.get('format')!r}); "
            "write it with LatentPairs.save"
        )
    if metadata.get("format_version") != _FORMAT_VERSION:
        raise ValueError(
            f"{file}: LatentPairs format version {metadata.get('format_version')!r}, "
            f"this code reads {_FORMAT_VERSION!r}; re-encode the pairs"
        )
    required = ("win", "lose", "prompt_index", "prompt_embeds", "label", "source_index")
    missing = [k for k in required if k not in tensors]
    if missing:
        raise ValueError(f"{file}: malformed LatentPairs shard, missing tensor(s) {missing}")
    try:
        prompts = json.loads(metadata["prompts"])
        names = json.loads(metadata["sources"])
        source = [names[i] for i in tensors.pop("source_index").tolist()]
        return LatentPairs(
            prompts=prompts,
            source=source,
            **{n: tensors.get(n) for n in LatentPairs._TENSORS},
        )
    except (KeyError, IndexError, json.JSONDecodeError, ValueError, TypeError) as e:
        raise ValueError(f"{file}: malformed LatentPairs shard ({e})") from e
