"""Prompt files: plain text, PartiPrompts-style TSV, JSON lists, or Pick-a-Pic parquet captions."""

from __future__ import annotations

import csv
import json
from pathlib import Path

FORMATS = ".txt (one prompt per line), .tsv (a 'Prompt' column), .json (a list of strings or of {\"prompt\": ...}), .parquet (a 'caption' column)"


def read_prompts(path: str | Path) -> list[str]:
    """Prompts in file order, stripped, blank ones skipped. Duplicates are kept."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist; expected {FORMATS}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        prompts = path.read_text(encoding="utf-8").splitlines()
    elif suffix == ".tsv":
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            if "Prompt" not in (reader.fieldnames or []):
                raise ValueError(f"{path}: a .tsv prompt file needs a 'Prompt' column, found {reader.fieldnames}")
            prompts = [row["Prompt"] for row in reader]
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json prompt file must hold a list, got {type(data).__name__}")
        prompts = []
        for i, item in enumerate(data):
            text = item.get("prompt") if isinstance(item, dict) else item
            if not isinstance(text, str):
                raise ValueError(f"{path}: entry {i} is neither a string nor an object with a string 'prompt': {item!r}")
            prompts.append(text)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "caption" not in table.column_names:
            raise ValueError(f"{path}: a .parquet prompt file needs a 'caption' column, found {table.column_names}")
        prompts = [str(c) for c in table.column("caption").to_pylist()]
    else:
        raise ValueError(f"{path}: unknown prompt file type {suffix!r}; use {FORMATS}")
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts found")
    return prompts
