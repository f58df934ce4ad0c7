"""Preference-pair data: files -> PairRecords -> cached latents -> training batches.

Reading is cheap and strict (a malformed row stops the run with its file:row), so a run
never trains on something other than what its logs report. Images go through the VAE
once (``encode_pairs``) and training then reads only cached latents and prompt
embeddings (``LatentPairs``), which is what makes each SAIL round fast.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from .models import DiffusionStack

__all__ = [
    "ImageSource",
    "PairRecord",
    "ReadStats",
    "read_pickapic_parquet",
    "read_pairs_jsonl",
    "write_pairs_jsonl",
    "LatentPairs",
    "PairBatch",
    "encode_pairs",
    "MixupSampler",
]

# A path, the encoded bytes of an image file (Pick-a-Pic stores jpgs inline), or a decoded image.
ImageSource = Union[str, os.PathLike, bytes, Image.Image]

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
FLIPS = ("none", "random", "always")
_FORMAT = "sail_fast.LatentPairs"
_FORMAT_VERSION = "1"


@dataclass
class PairRecord:
    """One preference pair before encoding: ``win`` is preferred over ``lose`` for ``prompt``.

    label: probability that ``win`` is preferred; 1.0 for hard human labels, below 1 for
        the soft labels of a smoothed-DPO variant.
    source: where the pair came from ("human", "sail", ...), carried into LatentPairs.
    origin: "file:row" (or "file:line"), used in error messages.
    """

    prompt: str
    win: ImageSource
    lose: ImageSource
    label: float = 1.0
    source: str = "human"
    origin: str = ""


@dataclass
class ReadStats:
    """What a reader kept and dropped, so a run never silently trains on fewer pairs than it reports."""

    read: int
    kept: int
    dropped_ties: int = 0

    def __str__(self) -> str:
        return f"read {self.read} rows, kept {self.kept} pairs, dropped {self.dropped_ties} ties"


# ----------------------------------------------------------------------------- readers


def _expand_files(paths, suffix: str, what: str) -> list[Path]:
    """A file, a list of files, or a directory of ``*suffix`` files, each checked to exist."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(f for f in p.glob(f"*{suffix}") if f.is_file())
            if not found:
                raise FileNotFoundError(f"directory {str(p)!r} holds no *{suffix} {what} files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{what} file {str(p)!r} does not exist")
    if not files:
        raise FileNotFoundError(f"no {what} files given")
    return files


def read_pickapic_parquet(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[PairRecord], ReadStats]:
    """Read Pick-a-Pic v2 parquet shards from local disk (a file, a list, or a directory of *.parquet).

    Uses the columns caption, jpg_0, jpg_1 (encoded image bytes) and label_0 (1.0: image 0
    preferred, 0.0: image 1 preferred, 0.5: tie). Ties are dropped and counted; the winner
    always comes first. Records hold the jpg bytes in memory, so read a subset of the
    shards rather than the whole dataset. Origins are "file:row" with 0-based rows.
    """
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is a declared dependency
        raise ImportError("reading Pick-a-Pic parquet needs pyarrow: pip install 'pyarrow>=14'") from e

    records: list[PairRecord] = []
    stats = ReadStats(read=0, kept=0)
    for file in _expand_files(paths, ".parquet", "parquet"):
        try:
            pf = pq.ParquetFile(file)
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError for a non-parquet file
            raise ValueError(f"{file}: not a readable parquet file ({e})") from e
        found = pf.schema_arrow.names
        missing = [c for c in PICKAPIC_COLUMNS if c not in found]
        if missing:
            raise ValueError(
                f"{file}: missing column(s) {missing}; found columns {found}. "
                f"A Pick-a-Pic v2 parquet needs {list(PICKAPIC_COLUMNS)}."
            )
        row = 0
        # Only the four needed columns, a slice at a time: shards also carry uids, urls, etc.
        for batch in pf.iter_batches(batch_size=1024, columns=list(PICKAPIC_COLUMNS)):
            cols = {name: batch.column(name).to_pylist() for name in PICKAPIC_COLUMNS}
            for caption, jpg_0, jpg_1, label_0 in zip(*(cols[c] for c in PICKAPIC_COLUMNS)):
                origin = f"{file}:{row}"
                row += 1
                stats.read += 1
                if label_0 is None or float(label_0) not in (0.0, 0.5, 1.0):
                    raise ValueError(f"{origin}: label_0 must be 1.0, 0.0 or 0.5 (tie), got {label_0!r}")
                if float(label_0) == 0.5:
                    stats.dropped_ties += 1
                    continue
                if caption is None or jpg_0 is None or jpg_1 is None:
                    raise ValueError(f"{origin}: caption, jpg_0 and jpg_1 must not be null")
                win, lose = (jpg_0, jpg_1) if float(label_0) == 1.0 else (jpg_1, jpg_0)
                records.append(PairRecord(str(caption), win, lose, 1.0, "human", origin))
                stats.kept += 1
    return records, stats


def read_pairs_jsonl(path: str | os.PathLike) -> tuple[list[PairRecord], ReadStats]:
    """Read pairs from a jsonl file: one {"prompt", "win", "lose"} object per line.

    Image paths are relative to the jsonl file's directory (absolute paths are kept).
    Optional keys: "label" (float in [0, 1], default 1.0) and "source" (default "human").
    Blank lines are skipped; every other problem raises ValueError naming file:line.
    Nothing is dropped, so ReadStats.read counts non-blank lines and equals kept.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {str(path)!r} does not exist")
    base = path.parent
    records: list[PairRecord] = []
    read = 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            read += 1
            origin = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{origin}: not valid JSON ({e.msg} at column {e.colno}); "
                    'write one object per line, e.g. {"prompt": "...", "win": "a.png", "lose": "b.png"}'
                ) from e
            if not isinstance(obj, dict):
                raise ValueError(f"{origin}: expected a JSON object with prompt, win and lose, got {type(obj).__name__}")
            missing = [k for k in ("prompt", "win", "lose") if k not in obj]
            if missing:
                raise ValueError(f"{origin}: missing key(s) {missing}; every line needs prompt, win and lose")
            if not isinstance(obj["prompt"], str):
                raise ValueError(f"{origin}: prompt must be a string, got {obj['prompt']!r}")
            images = {}
            for key in ("win", "lose"):
                rel = obj[key]
                if not isinstance(rel, str) or not rel:
                    raise ValueError(f"{origin}: {key} must be an image path string, got {rel!r}")
                full = base / rel
                if not full.is_file():
                    raise ValueError(
                        f"{origin}: {key} image {rel!r} not found (looked for {full}); "
                        "image paths are relative to the jsonl file's directory"
                    )
                images[key] = full
            label = obj.get("label", 1.0)
            if isinstance(label, bool) or not isinstance(label, (int, float)) or not 0.0 <= label <= 1.0:
                raise ValueError(f"{origin}: label must be a number in [0, 1] (probability win is preferred), got {label!r}")
            source = obj.get("source", "human")
            if not isinstance(source, str):
                raise ValueError(f"{origin}: source must be a string, got {source!r}")
            records.append(PairRecord(obj["prompt"], images["win"], images["lose"], float(label), source, origin))
    return records, ReadStats(read=read, kept=len(records))


def _png_ready(img: Image.Image) -> Image.Image:
    # PNG cannot hold CMYK, YCbCr, float modes...; RGB keeps what the VAE would see anyway.
    return img if img.mode in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA") else img.convert("RGB")


def write_pairs_jsonl(path: str | os.PathLike, records: Sequence[PairRecord]) -> Path:
    """Write records in the format read_pairs_jsonl reads; returns the jsonl path.

    Path images are stored relative to the jsonl directory. Bytes and PIL images are
    saved as PNG files under ``images/`` next to the jsonl (named after the jsonl file
    and the record index, so several jsonl files can share a directory).
    """
    path = Path(path)
    base = path.parent
    base.mkdir(parents=True, exist_ok=True)
    image_dir = base / "images"
    lines = []
    for i, rec in enumerate(records):
        entry = {"prompt": rec.prompt}
        for key in ("win", "lose"):
            src = getattr(rec, key)
            if isinstance(src, (str, os.PathLike)):
                target = Path(src).resolve()
            else:
                img = open_image(src, rec.origin or f"record {i}", key)
                image_dir.mkdir(exist_ok=True)
                target = (image_dir / f"{path.stem}-{i:06d}-{key}.png").resolve()
                _png_ready(img).save(target, format="PNG")
            try:
                entry[key] = Path(os.path.relpath(target, base.resolve())).as_posix()
            except ValueError:  # another drive on Windows: no relative path exists
                entry[key] = str(target)
        entry["label"] = float(rec.label)
        entry["source"] = rec.source
        lines.append(json.dumps(entry, ensure_ascii=False))
    # Write then rename, so a crash never leaves a half-written pairs file behind.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)
    return path


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
            problems.append(f"prompt_index must be int64 [{m}], got {self.prompt_index.dtype} {tuple(self.prompt_index.shape)}")
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
                raise ValueError(f"item {i} has latents {tuple(it.win.shape[1:])}, item 0 has {tuple(first.win.shape[1:])}")
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

    _TENSORS = ("win", "lose", "prompt_index", "prompt_embeds", "pooled_prompt_embeds", "time_ids_win", "time_ids_lose", "label")

    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors shard: the tensors, plus prompts/sources/format in its JSON metadata.

        Sources are stored as a table of names (metadata) and a per-pair index tensor,
        which keeps the header small for a million pairs.
        """
        from safetensors.torch import save_file

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
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        return path

    @staticmethod
    def load(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> "LatentPairs":
        """Load a shard, a list of shards, or a directory of *.safetensors shards (concatenated)."""
        shards = [_load_shard(f) for f in _expand_files(paths, ".safetensors", "LatentPairs shard")]
        return shards[0] if len(shards) == 1 else LatentPairs.cat(shards)


def _load_shard(file: Path) -> LatentPairs:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError for a truncated or foreign file
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from e
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


# ----------------------------------------------------------------------------- encoding


def open_image(src: ImageSource, origin: str, which: str) -> Image.Image:
    """Decode an image source fully, so a corrupt file fails here, naming the pair."""
    try:
        if isinstance(src, Image.Image):
            img = src
        elif isinstance(src, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(bytes(src)))
        elif isinstance(src, (str, os.PathLike)):
            img = Image.open(src)
        else:
            raise TypeError(f"unsupported image source type {type(src).__name__}")
        img.load()
        # Camera photos store their rotation in EXIF; the real size is the rotated one.
        return ImageOps.exif_transpose(img)
    except (OSError, UnidentifiedImageError, TypeError, ValueError, SyntaxError) as e:
        what = f"file {os.fspath(src)!r}" if isinstance(src, (str, os.PathLike)) else type(src).__name__
        raise ValueError(f"{origin or 'record'}: could not decode the {which} image ({what}): {e}") from e


def prepare_image(img: Image.Image, resolution: int, mode: str, flip: bool) -> tuple[np.ndarray, list[int]]:
    """Resize shortest side, centre crop, optionally mirror; returns [C, H, W] in [-1, 1] and SDXL time ids."""
    img = img.convert(mode)
    orig_w, orig_h = img.size
    scale = resolution / min(orig_w, orig_h)
    # max() guards against rounding the short side below the crop size.
    new_w = max(resolution, round(orig_w * scale))
    new_h = max(resolution, round(orig_h * scale))
    if (new_w, new_h) != img.size:
        # PIL's bicubic is antialiased when downscaling (its kernel widens with the scale).
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    # Same rounding as torchvision's CenterCrop, which diffusers' SDXL scripts record.
    top = int(round((new_h - resolution) / 2.0))
    left = int(round((new_w - resolution) / 2.0))
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip:
        img = ImageOps.mirror(img)
        # In the mirrored resized image the kept window starts this far from the left.
        left = new_w - resolution - left
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return arr, [orig_h, orig_w, top, left, resolution, resolution]


def _flip_decisions(n: int, flip: str, seed: int) -> list[bool]:
    if flip == "none":
        return [False] * n
    if flip == "always":
        return [True] * n
    # One draw per pair, in record order, so flips do not depend on batch_size.
    return (torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5).tolist()


def image_seeds(seed: int, n_items: int, per_item: int = 2) -> np.ndarray:
    """Independent seeds [n_items, per_item] (e.g. per pair and side): VAE sampling noise is then
    independent of batching."""
    state = np.random.SeedSequence(seed).generate_state(per_item * n_items, dtype=np.uint64) >> np.uint64(1)
    return state.reshape(n_items, per_item)


def image_mode(stack: DiffusionStack, resolution: int) -> str:
    """The PIL mode images are read in for ``stack`` ("L" or "RGB"), checking ``resolution`` fits its VAE."""
    vae = stack.vae
    channels = vae.config.in_channels if vae is not None else stack.latent_channels
    if channels not in (1, 3):
        where = "the VAE's in_channels" if vae is not None else "a pixel-space UNet's in_channels"
        raise ValueError(f"{where} is {channels}; images can be encoded only as 1 (grayscale) or 3 (RGB) channels")
    if vae is not None and resolution % stack.vae_scale_factor:
        raise ValueError(f"resolution {resolution} must be a multiple of the VAE scale factor {stack.vae_scale_factor}")
    return "L" if channels == 1 else "RGB"


def prompt_table(prompts: Sequence[str], stack: DiffusionStack, *, batch_size: int = 16, dtype: torch.dtype = torch.float32):
    """(unique prompts in first-seen order with "" last, their embeddings [U, L, D], pooled [U, D2] or None)."""
    unique = list(dict.fromkeys(p for p in prompts if p != ""))
    unique.append("")
    chunks = [stack.encode_prompts(unique[i : i + batch_size]) for i in range(0, len(unique), batch_size)]
    embeds = torch.cat([c.prompt_embeds for c in chunks]).to("cpu", dtype)
    pooled = None
    if chunks[0].pooled_prompt_embeds is not None:
        pooled = torch.cat([c.pooled_prompt_embeds for c in chunks]).to("cpu", dtype)
    return unique, embeds, pooled


def encode_pixels(pixels: torch.Tensor, stack: DiffusionStack, seeds: Sequence[int], origins: Sequence[str]) -> torch.Tensor:
    """Pixels [B, C, H, W] in [-1, 1] to float32 CPU latents (scaled; unchanged for a pixel-space stack).

    Each image samples the VAE's latent distribution with its own seed, so the result does not
    depend on how images are batched."""
    vae = stack.vae
    if vae is None:
        return pixels.float()
    param = next(vae.parameters())
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    with torch.no_grad():
        dist = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
        latents = (dist.sample(generator=gens) * vae.config.scaling_factor).float().cpu()
    if not torch.isfinite(latents).all():
        bad = [origins[k] for k in range(len(latents)) if not torch.isfinite(latents[k]).all()]
        raise ValueError(
            f"the VAE produced non-finite latents for {bad}; SDXL's VAE overflows in float16, "
            "so load it in float32 (or use a fp16-fixed VAE)"
        )
    return latents


def encode_pairs(
    records: Sequence[PairRecord],
    stack: DiffusionStack,
    *,
    resolution: int,
    flip: str = "none",
    seed: int = 0,
    batch_size: int = 16,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> LatentPairs:
    """Encode pairs once into LatentPairs (latents, prompt embeddings, SDXL time ids).

    resolution: pixel side fed to the VAE (for a pixel-space stack, the latent side).
        Each image is resized so its shortest side is ``resolution`` (bicubic), centre
        cropped to a square, and its original size and crop recorded for SDXL time ids.
    flip: "none", "random" (mirror a pair with probability 0.5, drawn from a generator
        seeded with ``seed``; winner and loser always share the flip) or "always".
    seed: also seeds the VAE's latent_dist.sample, one generator per image, so the
        result does not depend on ``batch_size``.
    batch_size: pairs per step; winners and losers go through the VAE in separate calls
        of that many images, prompts through the text encoders in chunks of that many.
    dtype: storage dtype of latents and prompt embeddings (time ids and labels are float32).
    """
    records = list(records)
    if not records:
        raise ValueError("encode_pairs needs at least one record")
    if flip not in FLIPS:
        raise ValueError(f"flip must be one of {FLIPS}, got {flip!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    mode = image_mode(stack, resolution)
    for r in records:
        if not 0.0 <= float(r.label) <= 1.0:
            raise ValueError(f"{r.origin or 'record'}: label must be in [0, 1], got {r.label}")

    prompts, prompt_embeds, pooled = prompt_table([r.prompt for r in records], stack, batch_size=batch_size, dtype=dtype)
    row_of = {p: i for i, p in enumerate(prompts)}
    flips = _flip_decisions(len(records), flip, seed)
    seeds = image_seeds(seed, len(records))
    win = lose = None
    time_ids = torch.empty(2, len(records), 6, dtype=torch.float32)

    bar = tqdm(total=len(records), desc="encode pairs", unit="pair", disable=not progress)
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        for side, key in enumerate(("win", "lose")):
            arrays = []
            for j, rec in enumerate(chunk):
                img = open_image(getattr(rec, key), rec.origin, key)
                arr, ids = prepare_image(img, resolution, mode, flips[start + j])
                arrays.append(arr)
                time_ids[side, start + j] = torch.tensor(ids, dtype=torch.float32)
            latents = encode_pixels(torch.from_numpy(np.stack(arrays)), stack, seeds[start : start + len(chunk), side],
                                    [rec.origin for rec in chunk])
            if win is None:
                win = torch.empty(len(records), *latents.shape[1:], dtype=dtype)
                lose = torch.empty_like(win)
            (win if side == 0 else lose)[start : start + len(chunk)] = latents.to(dtype)
        bar.update(len(chunk))
    bar.close()

    return LatentPairs(
        win=win,
        lose=lose,
        prompt_index=torch.tensor([row_of[r.prompt] for r in records], dtype=torch.int64),
        prompts=prompts,
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled,
        time_ids_win=time_ids[0].clone() if stack.is_sdxl else None,
        time_ids_lose=time_ids[1].clone() if stack.is_sdxl else None,
        label=torch.tensor([float(r.label) for r in records], dtype=torch.float32),
        source=[r.source for r in records],
    )


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
