"""SmPO-Diffusion's offline labels: every pair re-ordered and soft-labelled by a scoring model.

As the authors do with PickScore on Pick-a-Pic (JaydenLyh/SmPO ``preprocessing.py`` and ``train.py``): the
image the metric scores higher becomes the winner, and its label is
p = exp(n_w / T) / (exp(n_w / T) + exp(n_l / T)), n = (s - lo) / (hi - lo) with the metric's published range
(PickScore's raw-cosine range, ``metrics.clip_metrics.PICKSCORE_COSINE_RANGE``) or one given. Pairs the
human raters tied are dropped by the readers, as the authors drop them. ``sail-fast label`` writes the result
as a pairs.jsonl that ``data.seed_pairs`` reads, so ``train.loss: smpo`` trains on it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..data.records import (
    PairRecord,
    _png_ready,
    open_image,
    read_pairs_jsonl,
    read_pickapic_parquet,
    write_pairs_jsonl,
)
from ..runs.output_folder import writable_folder
from ..sail.ranking import soft_labels


def read_records(source: str | Path) -> list[PairRecord]:
    """Pairs from a pairs.jsonl or Pick-a-Pic parquet (a file or a folder of them)."""
    path = Path(source)
    records, stats = read_pairs_jsonl(path) if path.suffix == ".jsonl" else read_pickapic_parquet(path)
    print(f"{path}: {stats}")
    return records


def relabel(
    records: Sequence[PairRecord],
    metric,
    *,
    score_range: tuple[float, float] | None = None,
    temperature: float = 1.0,
    batch_size: int = 16,
    progress: bool = True,
) -> list[PairRecord]:
    """Each pair ordered by ``metric`` (a ``sail_fast.metrics`` Metric) with its min-max soft label."""
    score_range = score_range or metric.soft_label_range
    if score_range is None:
        raise ValueError(f"{metric.name} has no published score range for min-max labels; pass --range LO HI")
    out = []
    for start in tqdm(
        range(0, len(records), batch_size), desc=f"label by {metric.name}", unit="batch", disable=not progress
    ):
        chunk = records[start : start + batch_size]
        prompts = [r.prompt for r in chunk]
        first = metric.score([open_image(r.win, r.origin, "win") for r in chunk], prompts)
        second = metric.score([open_image(r.lose, r.origin, "lose") for r in chunk], prompts)
        scores = torch.stack([first, second], dim=1)
        win = scores.argmax(1)
        lose = 1 - win
        labels = soft_labels(scores, win, lose, temperature, "minmax", score_range)
        for rec, w, p in zip(chunk, win.tolist(), labels.tolist()):
            pair = (rec.win, rec.lose) if w == 0 else (rec.lose, rec.win)
            out.append(PairRecord(rec.prompt, *pair, label=p, source=metric.name, origin=rec.origin))
    return out


def label_pairs(sources: Sequence[str | Path], metric, out: str | Path, **kw) -> Path:
    """Read ``sources``, relabel them with ``metric`` and write ``out`` (a pairs.jsonl); returns it."""
    out = Path(out)
    if out.exists():  # the commands' rule: never replace a file (sail_fast.runs.output_folder)
        raise FileExistsError(
            f"--out {out} already exists; `sail-fast label` never replaces a file: name a new pairs.jsonl"
        )
    writable_folder(out.parent, "--out")  # a read-only place is refused now, not after every pair is scored
    records = [r for source in sources for r in read_records(source)]
    if not records:
        raise ValueError(f"{', '.join(map(str, sources))}: no pairs to label")
    labelled = relabel(records, metric, **kw)
    try:
        return write_pairs_jsonl(out, write_images(labelled, out))
    except OSError as err:
        if err.filename is not None:
            raise
        # PIL and file objects report a full disk without the path: name the output.
        raise OSError(err.errno, err.strerror or str(err), str(out)) from err


def write_images(records: Sequence[PairRecord], out: Path) -> list[PairRecord]:
    """The records with their in-memory pictures (Pick-a-Pic's jpg bytes) written as PNGs in ``images/`` beside
    ``out``, named as ``write_pairs_jsonl`` names them; pictures already in files stay where they are. A picture
    name that already exists is refused before any is written: label never replaces a file."""

    def target_of(i: int, key: str) -> Path:
        return out.parent / "images" / f"{out.stem}-{i:06d}-{key}.png"

    taken = [
        target_of(i, key)
        for i, rec in enumerate(records)
        for key in ("win", "lose")
        if not isinstance(getattr(rec, key), (str, os.PathLike)) and os.path.lexists(target_of(i, key))
    ]
    if taken:
        raise FileExistsError(
            f"{taken[0]} already exists ({len(taken)} picture names taken); label never replaces a "
            "file: choose another --out name, or move those pictures away"
        )

    def on_disk(rec: PairRecord, i: int, key: str):
        src = getattr(rec, key)
        if isinstance(src, (str, os.PathLike)):
            return src
        target = target_of(i, key)
        save_png_whole(open_image(src, rec.origin or f"record {i}", key), target)
        return target

    return [
        PairRecord(rec.prompt, on_disk(rec, i, "win"), on_disk(rec, i, "lose"), rec.label, rec.source, rec.origin)
        for i, rec in enumerate(records)
    ]


def save_png_whole(image, target: Path) -> None:
    """``image`` as a PNG at ``target``, written under a temporary name and renamed once whole: a full disk or a
    kill leaves no half-written picture, under either name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".sail-fast-partial-", suffix="-" + target.name, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp)  # a fresh name: never one of the user's files
    try:
        _png_ready(image).save(tmp, format="PNG")
        os.replace(tmp, target)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):  # PIL reports a full disk without the path: name the picture
            raise OSError(err.errno, err.strerror or str(err), str(target)) from err
        raise
