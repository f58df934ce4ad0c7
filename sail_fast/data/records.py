"""Preference pairs as records: read from Pick-a-Pic parquet or pairs.jsonl, written back as pairs.jsonl.

Reading is cheap and strict (a malformed row stops the run with its file:row), so a run
never trains on something other than what its logs report.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..runs.run_folder import atomic_write_text

ImageSource = Union[str, os.PathLike, bytes, Image.Image]

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")


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
    duplicates: int = 0  # rows repeating an earlier pair (prompt, winner, loser): kept, so trained as often as given

    def __str__(self) -> str:
        text = f"read {self.read} rows, kept {self.kept} pairs, dropped {self.dropped_ties} ties"
        if self.duplicates:
            text += (
                f"; WARNING: {self.duplicates} rows repeat an earlier pair (same prompt, winner and loser) and are "
                "trained as often as they appear: remove them to weight every pair once"
            )
        return text


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
                raise ValueError(
                    f"{origin}: expected a JSON object with prompt, win and lose, got {type(obj).__name__}"
                )
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
                raise ValueError(
                    f"{origin}: label must be a number in [0, 1] (probability win is preferred), got {label!r}"
                )
            source = obj.get("source", "human")
            if not isinstance(source, str):
                raise ValueError(f"{origin}: source must be a string, got {source!r}")
            records.append(PairRecord(obj["prompt"], images["win"], images["lose"], float(label), source, origin))
    distinct = {(r.prompt, Path(r.win).resolve(), Path(r.lose).resolve()) for r in records}
    return records, ReadStats(read=read, kept=len(records), duplicates=len(records) - len(distinct))


def open_image(src: ImageSource, origin: str, which: str) -> Image.Image:
    """Decode an image source fully, so a corrupt file fails here, naming the pair; the picture comes back as
    8-bit grey (L) or RGB, whatever its mode on disk (``eight_bit``)."""
    what = f"file {os.fspath(src)!r}" if isinstance(src, (str, os.PathLike)) else type(src).__name__
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its pixel limit and twice that: refused the same as above it.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
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
        return eight_bit(ImageOps.exif_transpose(img))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(
            f"{origin or 'record'}: the {which} image ({what}) has more than {Image.MAX_IMAGE_PIXELS:,} "
            "pixels, Pillow's limit against decompression bombs; downscale it"
        ) from None
    except (OSError, UnidentifiedImageError, TypeError, ValueError, SyntaxError) as e:
        raise ValueError(f"{origin or 'record'}: could not decode the {which} image ({what}): {e}") from e


def _png_ready(img: Image.Image) -> Image.Image:
    # PNG cannot hold CMYK, YCbCr, float modes...; RGB keeps what the VAE would see anyway.
    return img if img.mode in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA") else img.convert("RGB")


SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def eight_bit(img: Image.Image) -> Image.Image:
    """The picture as 8-bit L (grey sources) or RGB, as the models read it. Pillow's own convert() clips deeper
    values at 255, so a 16-bit PNG would turn white: 16- and 32-bit grey are scaled (65535 -> 255), float grey is
    taken as [0, 1]; a transparent picture is laid on white (convert() would show what hides under the alpha)."""
    if img.mode in SIXTEEN_BIT or img.mode == "I":
        return _scaled_grey(img, 65535.0, "integer")  # 32-bit grey: how older Pillow reads 16-bit PNGs
    if img.mode == "F":
        return _scaled_grey(img, 1.0, "float")
    if img.mode == "P":  # a palette: RGBA when one of its colours is transparent
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        flat = Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
        return flat.convert("L") if img.mode in ("LA", "La") else flat
    if img.mode in ("1", "L"):
        return img.convert("L")
    return img.convert("RGB")  # RGB, CMYK, YCbCr, LAB, HSV: Pillow converts these exactly


def _scaled_grey(img: Image.Image, top: float, kind: str) -> Image.Image:
    """Grey values in [0, ``top``] scaled to 8 bits; values outside that range have no known meaning: refused."""
    values = np.asarray(img, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if not (np.isfinite(values).all() and 0 <= low and high <= top):
        raise ValueError(
            f"{img.mode} ({kind}) grey values span [{low:g}, {high:g}], outside [0, {top:g}]; save it as an "
            "8- or 16-bit PNG"
        )
    return Image.fromarray(np.round(values * (255.0 / top)).astype(np.uint8))


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
    atomic_write_text(path, "".join(line + "\n" for line in lines))  # a crash never leaves half a pairs file
    return path
