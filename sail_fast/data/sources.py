"""Turn the config's list of pair files into one LatentPairs, encoding images once.

Each entry is a ``pairs.jsonl`` file, Pick-a-Pic parquet (a file or a directory of them),
or latent shards (a ``.safetensors`` file or a directory of them). Image pairs are encoded
by the VAE and text encoders once and cached; the cache key covers the files and every image
a pairs.jsonl names (path, size and mtime in nanoseconds, not a content hash: reading every
image of a large set at each start would cost more than it guards), the model and the
preprocessing, so a change anywhere re-encodes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

from ..diffusion.stack import DiffusionStack
from ..runs.config import DataConfig, ModelConfig
from ..runs.distributed import DistInfo
from .encode import encode_pairs
from .latent_pairs import LatentPairs
from .records import PairRecord, read_pairs_jsonl, read_pickapic_parquet


def _kind_of(path: Path) -> str:
    if path.is_file():
        suffix = {".jsonl": "jsonl", ".parquet": "parquet", ".safetensors": "latents"}.get(path.suffix)
        if suffix:
            return suffix
    elif path.is_dir():
        if any(path.glob("*.safetensors")):
            return "latents"
        if any(path.glob("*.parquet")):
            return "parquet"
    raise ValueError(
        f"{path}: not a pairs.jsonl file, a Pick-a-Pic .parquet file or directory, or latent .safetensors shards"
    )


def fingerprint(paths: Sequence[Path], settings: dict) -> str:
    """A cache key over files (each path, or a directory's files: name, size, mtime) and ``settings``."""
    files = []
    for p in paths:
        for f in sorted([p] if p.is_file() else p.iterdir()):
            if f.is_file():
                st = f.stat()
                files.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    key = {"files": files, **settings}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _stat(name: str) -> list:
    try:
        st = os.stat(name)
    except OSError:
        return [name, None, None]  # encoding will name the missing file
    return [name, st.st_size, st.st_mtime_ns]


def load_pairs(
    sources: Sequence[str],
    stack: DiffusionStack,
    *,
    model: ModelConfig,
    data: DataConfig,
    cache_dir: str | Path,
    seed: int = 0,
    dist: DistInfo = DistInfo(),
    log=print,
) -> LatentPairs:
    """All pairs from ``sources`` as one LatentPairs (capped at ``data.max_seed_pairs``)."""
    if not sources:
        raise ValueError("data.seed_pairs is empty: list at least one pairs.jsonl, parquet or latent shard path")
    parts: list[LatentPairs] = []
    image_sources: list[Path] = []
    records: list[PairRecord] = []
    for raw in sources:
        path = Path(raw).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data.seed_pairs entry {raw} does not exist")
        kind = _kind_of(path)
        if kind == "latents":
            parts.append(LatentPairs.load(path))
            log(f"{path}: {len(parts[-1])} latent pairs")
            continue
        found, stats = read_pairs_jsonl(path) if kind == "jsonl" else read_pickapic_parquet(path)
        log(f"{path}: {stats}")
        if not found:
            raise ValueError(
                f"{path} holds no usable pairs ({stats}); fill it or remove it from the config's pair list"
            )
        records += found
        image_sources.append(path)
    if records:
        # The images a pairs.jsonl names are part of the key too (size and mtime: an image fixed on disk
        # is encoded again; parquet holds its images' bytes, covered by the file's own entry).
        named = sorted(
            {str(src) for rec in records for src in (rec.win, rec.lose) if isinstance(src, (str, os.PathLike))}
        )
        settings = {
            "model": model.model_dump(),
            "resolution": data.resolution,
            "flip": data.flip,
            "seed": seed,
            "images": [_stat(name) for name in named],
        }
        cache = Path(cache_dir) / f"pairs-{fingerprint(image_sources, settings)}.safetensors"
        if dist.is_main and not cache.exists():
            cache.parent.mkdir(parents=True, exist_ok=True)
            encoded = encode_pairs(
                records, stack, resolution=data.resolution, flip=data.flip, seed=seed, batch_size=data.encode_batch_size
            )
            encoded.save(cache)  # written under a temporary name and renamed
        dist.barrier()
        parts.append(LatentPairs.load(cache, fix="delete it and rerun: the pairs are encoded again"))
        log(f"{len(records)} image pairs encoded once, cached at {cache}")
    pairs = parts[0] if len(parts) == 1 else LatentPairs.cat(parts)
    if data.max_seed_pairs is not None and len(pairs) > data.max_seed_pairs:
        log(f"keeping the first {data.max_seed_pairs} of {len(pairs)} pairs (data.max_seed_pairs)")
        pairs = pairs.subset(list(range(data.max_seed_pairs)))
    return pairs
