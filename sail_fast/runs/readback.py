"""Reading back what a run or a command wrote earlier, checked the way weights are: a damaged file is refused in
one line that names it and says what to do, never used and never a traceback.

- ``read_json_file``: every JSON a command reads back (stage records, rankings, scores); invalid JSON is named.
- ``save_checked_tensors`` / ``load_checked_tensors``: safetensors files that carry the sha256 of their own
  contents (metadata and tensors) in their header, so each file is its own record, whichever rank wrote it and
  wherever it is copied; a file that no longer matches, or does not parse, is refused.
- ``check_run_weights``: weights inside a sail-fast run must have the manifest written with them.
- ``check_run_records``: everything a resumed SAIL run reads back from its finished stages, read before any
  stage runs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .layout import RunLayout
from .run_folder import MANIFEST, atomic_save_tensors, check_weights

DIGEST_KEY = "sail_fast.sha256"  # the safetensors metadata entry that holds the file's own content digest
RESTORE = "restore it from a copy, or delete it and run again what wrote it"


class DamagedFileError(ValueError):
    """A file written earlier that no longer reads back as it was written (one line: the file and what to do)."""


def _reason(err: BaseException) -> str:
    """The first line of an error's text: the parser's own words, short enough for a one-line message."""
    if isinstance(err, UnicodeDecodeError):
        return "its bytes are not UTF-8 text"
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_json_file(path: str | Path, fix: str = RESTORE):
    """The JSON in ``path``; a file that is not valid JSON is refused naming it, with ``fix`` (what to do)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8 (a zeroed or truncated file)
        raise DamagedFileError(f"{path}: not valid JSON ({_reason(err)}); {fix}") from None


def content_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 over the metadata (less the digest itself) and each tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in metadata.items() if k != DIGEST_KEY}, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save_checked_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """``atomic_save_tensors`` with the digest of the contents in the header (``load_checked_tensors`` checks it)."""
    metadata = dict(metadata or {})
    metadata[DIGEST_KEY] = content_digest(tensors, metadata)
    atomic_save_tensors(tensors, path, metadata)


def load_checked_tensors(path: str | Path, fix: str, *, require_digest: bool = False) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file; one that does not parse, or whose contents differ from the digest
    in its header, is refused naming it, with ``fix``. A file without a digest (written before files carried one,
    or by another tool) is read as it is, unless ``require_digest``: a file a run always writes with one."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except OSError:
        raise  # missing or unreadable: the command's error line names the path
    except Exception as err:  # SafetensorError (no OSError) for a zeroed, truncated or foreign file
        raise DamagedFileError(f"{path} is damaged ({_reason(err)}); {fix}") from None
    recorded = metadata.get(DIGEST_KEY)
    if recorded is None:
        if require_digest:
            raise DamagedFileError(
                f"{path} carries no sha256 of its contents (written by an older sail-fast, or its "
                f"header was changed), so it cannot be checked; {fix}"
            )
        return tensors, metadata
    if content_digest(tensors, metadata) != recorded:
        raise DamagedFileError(
            f"{path} is damaged (its contents do not match the sha256 recorded when it was written); {fix}"
        )
    return tensors, metadata


class UncheckedWeightsError(ValueError):
    """Weights inside a sail-fast run whose manifest is gone: their bytes cannot be checked."""


def run_root(path: str | Path) -> Path | None:
    """The run folder (the one with config.yaml) that holds ``path``, if any."""
    path = Path(path)
    return next((p for p in (path, *path.parents) if RunLayout(p).config.is_file()), None)


def check_run_weights(folder: str | Path) -> None:
    """``run_folder.check_weights``, and more: a run writes a manifest beside all the weights it keeps (a stage's
    ``final/``, each checkpoint), so inside a run, weights without one are refused, since changed bytes would
    load unnoticed. A folder outside any run (a downloaded pipeline) is not checked."""
    folder = Path(folder)
    if not any((f / MANIFEST).is_file() for f in (folder, folder.parent)) and run_root(folder) is not None:
        raise UncheckedWeightsError(
            f"{folder} has no {MANIFEST} (nor has {folder.parent}), so its weights cannot be checked; restore the "
            f"{MANIFEST} written with them, or train that stage again (delete its folder and the later stages' "
            "folders, then rerun with --resume)"
        )
    check_weights(folder)


def _check_record(path: Path, fix: str) -> None:
    if path.is_file() and not isinstance(read_json_file(path, fix), dict):
        raise DamagedFileError(f"{path} does not hold a JSON object, as written; {fix}")


def check_run_records(layout: RunLayout, rounds: int) -> None:
    """Read every record a resumed SAIL run reads back (the labelled pairs' done.json, and each stage's done.json,
    eval.json, ranking.json and eval samples; a soup's too) before any stage runs, so damage is named at once."""
    _check_record(layout.human_pairs().done, f"delete {layout.human}/ and rerun with --resume to label the pairs again")
    for stage in RunLayout.stage_names(rounds) + layout.soups():
        fix = f"delete {layout.stage(stage)}/ and rerun with --resume to run that stage again"
        records = [layout.done(stage), layout.eval_json(stage)]
        if not RunLayout.is_soup(stage) and RunLayout.round_of(stage) > 0:
            records.append(layout.ranking(RunLayout.round_of(stage)))
        for path in records:
            _check_record(path, fix)
        if layout.eval_samples(stage).is_file():
            load_checked_tensors(layout.eval_samples(stage), fix)
