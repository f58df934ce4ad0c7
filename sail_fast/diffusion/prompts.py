"""Prompt files: plain text, PartiPrompts-style TSV, JSON lists, or Pick-a-Pic parquet captions;
and the evaluation prompt sets with their groups (HPSv2 styles, PartiPrompts categories)."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# Limits checked before a prompt file is used: a 10 MB one-line file would otherwise take minutes and
# gigabytes in the tokenizer before failing. The text encoders read 77 tokens (a few hundred characters).
MAX_PROMPT_FILE_BYTES = 100 * 2**20  # a million prompts of 100 characters
MAX_PROMPT_CHARS = 10_000

FORMATS = ".txt (one prompt per line), .tsv (a 'Prompt' column), .json (a list of strings or of {\"prompt\": ...}), .parquet (a 'caption' column)"


def _read_text(path: Path) -> str:
    size = path.stat().st_size
    if size > MAX_PROMPT_FILE_BYTES:
        raise ValueError(
            f"{path}: {size / 2**20:.0f} MB, over the {MAX_PROMPT_FILE_BYTES // 2**20} MB limit for a prompt "
            "file; split it or give fewer prompts"
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); save the prompt file as UTF-8"
        ) from None


def _read_json(path: Path):
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None


def read_prompts(path: str | Path) -> list[str]:
    """Prompts in file order, stripped, blank ones skipped. Duplicates are kept."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist; expected {FORMATS}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        prompts = _read_text(path).splitlines()
    elif suffix == ".tsv":
        reader = csv.DictReader(io.StringIO(_read_text(path), newline=""), delimiter="\t")
        if "Prompt" not in (reader.fieldnames or []):
            raise ValueError(f"{path}: a .tsv prompt file needs a 'Prompt' column, found {reader.fieldnames}")
        prompts = [row["Prompt"] for row in reader]
    elif suffix == ".json":
        data = _read_json(path)
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json prompt file must hold a list, got {type(data).__name__}")
        prompts = []
        for i, item in enumerate(data):
            text = item.get("prompt") if isinstance(item, dict) else item
            if not isinstance(text, str):
                raise ValueError(
                    f"{path}: entry {i} is neither a string nor an object with a string 'prompt': {item!r}"
                )
            prompts.append(text)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        columns = pq.read_schema(path).names
        if "caption" not in columns:
            raise ValueError(f"{path}: a .parquet prompt file needs a 'caption' column, found {columns}")
        # The caption column only: a Pick-a-Pic shard also holds its images.
        prompts = [str(c) for c in pq.read_table(path, columns=["caption"]).column("caption").to_pylist()]
    else:
        raise ValueError(f"{path}: unknown prompt file type {suffix!r}; use {FORMATS}")
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts found")
    _check_lengths(path, prompts)
    return prompts


def _check_lengths(path: Path, prompts: list[str]) -> None:
    """Refuse a prompt far longer than any text encoder reads: a file that is not a prompt list."""
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    if len(prompts[longest]) > MAX_PROMPT_CHARS:
        raise ValueError(
            f"{path}: prompt {longest + 1} has {len(prompts[longest]):,} characters, over the limit of "
            f"{MAX_PROMPT_CHARS:,} (a text encoder reads about 300); is this a prompt file, one prompt a line?"
        )


# The HPSv2 benchmark's four styles, in its published order.
HPS_STYLES = ("anime", "concept-art", "paintings", "photo")
PROMPT_SETS = ("auto", "hpsv2", "parti", "pickapic", "plain")


@dataclass
class PromptSet:
    """Prompts to evaluate on; ``groups[i]`` is prompt i's group (an HPSv2 style, a PartiPrompts
    category) when the set has groups, and results are also reported per group."""

    name: str
    prompts: list[str]
    groups: list[str] | None = None

    def limit(self, n: int | None) -> "PromptSet":
        """The first ``n`` prompts of each group (of the whole set when it has no groups)."""
        if n is None:
            return self
        if self.groups is None:
            return PromptSet(self.name, self.prompts[:n])
        taken: Counter[str] = Counter()
        keep = []
        for i, group in enumerate(self.groups):
            if taken[group] < n:
                keep.append(i)
                taken[group] += 1
        return PromptSet(self.name, [self.prompts[i] for i in keep], [self.groups[i] for i in keep])


def _hpsv2(path: Path) -> PromptSet:
    """A folder of the four style files (anime.json, ...), one JSON whose entries carry a "style", or one
    JSON list of the four styles' prompts in the published order (equal blocks)."""
    if path.is_dir():
        files = [path / f"{style}.json" for style in HPS_STYLES]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{path}: an HPSv2 benchmark folder needs {', '.join(f.name for f in files)}; missing {missing}"
            )
        prompts, groups = [], []
        for style, file in zip(HPS_STYLES, files):
            part = read_prompts(file)
            prompts += part
            groups += [style] * len(part)
        return PromptSet("hpsv2", prompts, groups)
    data = _read_json(path) if path.suffix.lower() == ".json" else None
    if not isinstance(data, list):
        raise ValueError(
            f"{path}: an HPSv2 prompt set is a folder of {', '.join(HPS_STYLES)} .json files or one .json list"
        )
    prompts = read_prompts(path)
    if all(isinstance(item, dict) and "style" in item for item in data):
        return PromptSet("hpsv2", prompts, [str(item["style"]) for item in data])
    if len(prompts) % len(HPS_STYLES):
        raise ValueError(
            f"{path}: {len(prompts)} prompts do not split into the {len(HPS_STYLES)} HPSv2 styles "
            f'({", ".join(HPS_STYLES)}) in equal blocks; give each entry a "style" or use the style folder'
        )
    block = len(prompts) // len(HPS_STYLES)
    return PromptSet("hpsv2", prompts, [HPS_STYLES[i // block] for i in range(len(prompts))])


def _parti(path: Path) -> PromptSet:
    prompts = read_prompts(path)
    with path.open(encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t") if r["Prompt"] and r["Prompt"].strip()]
    groups = [r.get("Category") or "-" for r in rows] if "Category" in rows[0] else None
    return PromptSet("parti", prompts, groups)


def read_prompt_set(path: str | Path, kind: str = "auto") -> PromptSet:
    """An evaluation prompt set. ``kind``: hpsv2 (per-style means), parti (per-category means, .tsv),
    pickapic (.parquet captions, .json or .txt), plain (any prompt file), or auto (a folder is
    hpsv2, a .tsv is parti, a .json with "style" entries is hpsv2, anything else plain)."""
    if kind not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set kind {kind!r}; choose from {', '.join(PROMPT_SETS)}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"prompt set {str(path)!r} does not exist; expected {FORMATS}, or an HPSv2 style folder"
        )
    if kind == "auto":
        if path.is_dir():
            kind = "hpsv2"
        elif path.suffix.lower() == ".tsv":
            kind = "parti"
        elif path.suffix.lower() == ".json" and '"style"' in _read_text(path):
            kind = "hpsv2"
        else:
            kind = "plain"
    if kind == "hpsv2":
        return _hpsv2(path)
    if kind == "parti":
        if path.suffix.lower() != ".tsv":
            raise ValueError(f"{path}: PartiPrompts is a .tsv with a 'Prompt' column")
        return _parti(path)
    return PromptSet(kind if kind == "pickapic" else path.stem, read_prompts(path))
