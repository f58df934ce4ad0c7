"""The run folder's safety rules: atomic writes, one run at a time, verified checkpoints,
and a resume that cannot silently mix configurations.

- ``atomic_target`` / ``atomic_write_text`` / ``atomic_save_tensors`` / ``write_json``: written to a
  temporary name and renamed, so a kill never leaves half a file.
- ``RunLock``: ``<run>/run.lock`` holds the host and pid of the run using the folder; a second
  run is refused with the holder's name; a lock left by a killed process on this host is stale
  and taken over; an unreadable one is not ours and is refused.
- ``check_new_run_folder`` / ``check_run_record``: a run never replaces a file it did not write; its
  ``run.json`` proves the folder's config.yaml is the run's own (its sha256).
- ``write_manifest`` / ``verify_manifest`` / ``check_weights``: each checkpoint and each stage's ``final/``
  lists its files with their sizes and sha256 in ``manifest.json``, written last. A checkpoint whose files
  do not match is skipped on resume; finished weights that do not match are refused (one line naming the
  file) wherever they are loaded: the next stage, --resume, generate, eval and export.
- ``config_changes``: the keys that differ between the config a run started with and the one it
  is resumed with, less those that cannot change a result (``RESULT_NEUTRAL_KEYS``).
- ``load_recorded_config``: a run's own config.yaml, read with keys renamed since it was written
  (``config.RENAMED``) under their new names, so old runs resume, generate and export.

A SAIL run's folder (each stage writes ``done.json`` last; ``--resume`` skips finished stages and
continues a half-trained one from its latest intact checkpoint)::

    config.yaml       the config the run started with (config.resume-N.yaml: later ones, --allow-config-change)
    run.json          the sail-fast, torch and diffusers versions it began with, and config.yaml's sha256
    run.lock          host and pid of the run working here (sail_fast.runs.run_folder)
    human/            toy world: the labelled pairs (all.jsonl, seed.jsonl, heldout.jsonl)
    base/eval.json    the base model's evaluation
    iter0/            DPO on the seed against the base: config.yaml (as the stage ran), checkpoints/, final/unet, eval.json
    real-digits/      toy world, RealAlign: the real images with captions (metadata.jsonl)
    round-01/         candidates.rank0.safetensors, pairs.safetensors (latent shard),
                      ranking.json, candidates.png, train/ (checkpoints/, final/unet), eval.json;
                      RealAlign: real_losers.rank0.safetensors, real_pairs.png
    soup-00-02/       sail.soup: the weight average of iter0..round-02 (final/unet, a whole UNet), eval.json
    chosen.json       the stage the run keeps (sail.select, sail.soup) and why
    summary.md        every stage's round score, the kept one marked
    metrics.json      one row per stage: reward spread, self-label agreement, diversity, metrics
    curves.png        those rows as curves
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from .layout import RunLayout, TrainingLayout
from .versions import describe_version_change, version_record
from .yaml_files import dump_yaml, read_yaml

MANIFEST = "manifest.json"
LOCK = "run.lock"
# Keys that change where or how visibly a run works, never what it computes.
RESULT_NEUTRAL_KEYS = frozenset({"output_dir", "data.cache_dir", "train.progress", "sail.grid_prompts"})


@contextlib.contextmanager
def atomic_target(path: str | Path):
    """Yields a temporary name beside ``path`` to write to; renamed to ``path`` when the block ends, so a
    kill never leaves half a file under the real name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    yield tmp
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_target(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_save_tensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_target(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------- the lock
class RunLockedError(RuntimeError):
    """Another live process holds the run folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive lock on a run folder for the lifetime of a run (a context manager)."""

    def __init__(self, run_dir: str | Path, log=None) -> None:
        self.path = Path(run_dir) / LOCK
        self.log = log or (lambda text: None)
        self.held = False

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                self._create(me)
            except FileExistsError:
                holder = self._holder()
                if holder is None:  # our locks are whole from the start (linked into place): this one is not ours
                    raise RunLockedError(
                        f"{self.path} is not a lock sail-fast wrote (unreadable); if no run is using "
                        f"{self.path.parent}, delete {self.path} and run again"
                    ) from None
                if holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1))):
                    self.log(f"removing a stale lock {self.path} ({holder}): its process has ended")
                    self.path.unlink(missing_ok=True)
                    continue
                if holder.get("host") == me["host"] and int(holder.get("pid", -1)) == me["pid"]:
                    raise RunLockedError(f"{self.path.parent} is already in use by this process")
                raise RunLockedError(
                    f"{self.path.parent} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}, "
                    f"since {holder.get('since')}); wait for it to finish, choose another output_dir, or delete "
                    f"{self.path} if that run is gone"
                ) from None
            self.held = True
            return self
        raise RunLockedError(f"could not take {self.path}: another run keeps re-creating it")

    def _create(self, me: dict) -> None:
        """Write the lock under a private name, then link it into place: it never exists half-written, and the
        link fails if another lock is there (FileExistsError)."""
        fd, tmp = tempfile.mkstemp(prefix=".run.lock-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            os.link(tmp, self.path)
        finally:
            os.unlink(tmp)

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
            int(holder.get("pid"))
            return holder
        except (OSError, ValueError, TypeError, AttributeError):
            return None

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------- checkpoints
_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime) -> sha256: a file read twice in one process is hashed once


def file_sha256(path: str | Path) -> str:
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        with path.open("rb") as f:
            _DIGESTS[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _DIGESTS[key]


def write_manifest(folder: str | Path) -> None:
    """List every file under ``folder`` with its size and sha256, in ``manifest.json`` (written last)."""
    folder = Path(folder)
    files = {
        str(f.relative_to(folder)): {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name != MANIFEST
    }
    write_json(folder / MANIFEST, {"files": files})


def verify_manifest(folder: str | Path) -> str | None:
    """None if ``folder`` matches its manifest, else why not (naming the file)."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        return f"no {MANIFEST} (the checkpoint was never finished)"
    try:
        files = read_json(folder / MANIFEST)["files"]
    except (OSError, ValueError, KeyError) as err:
        return f"unreadable {folder / MANIFEST} ({err})"
    for name, recorded in files.items():
        path = folder / name
        # Manifests before content hashes recorded the size alone.
        size, digest = (recorded, None) if isinstance(recorded, int) else (recorded["bytes"], recorded["sha256"])
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {size} (truncated or replaced)"
        if digest is not None and file_sha256(path) != digest:
            return f"{path} does not match the sha256 recorded when it was written (its bytes changed)"
    return None


class WeightsChangedError(ValueError):
    """Weights that no longer match the manifest written with them."""


def check_weights(folder: str | Path) -> None:
    """Refuse weights (a ``unet/`` or ``lora/`` folder) whose bytes differ from the manifest written beside them
    (in the folder or its parent: a checkpoint or a stage's ``final/``). Folders without one (a downloaded
    pipeline, a run from before manifests) are not checked."""
    folder = Path(folder)
    owner = next((f for f in (folder, folder.parent) if (f / MANIFEST).is_file()), None)
    if owner is None:
        return
    problem = verify_manifest(owner)
    if problem is not None:
        raise WeightsChangedError(
            f"refusing the weights in {folder}: {problem}; restore the file, or train that "
            "stage again (delete its folder and the later stages' folders, then --resume)"
        )


# ------------------------------------------------------------------------ configs
def _flatten(data, prefix: str = "") -> dict:
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            out |= _flatten(value, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: data}


def config_changes(before: dict, after: dict) -> dict[str, tuple]:
    """{key: (before, after)} for every key whose value differs, except the result-neutral ones."""
    old, new = _flatten(before), _flatten(after)
    return {
        k: (old.get(k), new.get(k))
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k) and k not in RESULT_NEUTRAL_KEYS
    }


def describe_changes(changes: dict[str, tuple]) -> str:
    return "\n".join(f"  {key}: {a!r} -> {b!r}" for key, (a, b) in changes.items())


# ------------------------------------------------------------------ folders we fill
class FolderInUseError(FileExistsError):
    """A folder a command would write into holds files the command did not write."""


# ------------------------------------------------------------------ config records
class ConfigChangedError(ValueError):
    """--resume with a config that differs from the one the run started with."""


def current_names(recorded: dict) -> dict:
    """A config a run recorded, with keys renamed since (``config.RENAMED``) under their new names and values
    renamed since (``config.RENAMED_VALUES``) under their new values, also in ``sail.round_overrides``."""
    from .config import RENAMED, RENAMED_VALUES

    for old, new in RENAMED.items():
        (section, key), renamed = old.split("."), new.split(".")[1]
        part = recorded.get(section) or {}
        if key in part:
            part[renamed] = part.pop(key)
        for r, items in (part.get("round_overrides") or {}).items():
            part["round_overrides"][r] = [
                new + item[len(old) :] if item.split("=")[0].strip() == old else item for item in items
            ]
    for name, values in RENAMED_VALUES.items():
        section, key = name.split(".")
        part = recorded.get(section) or {}
        if part.get(key) in values:
            part[key] = values[part[key]]
        for r, items in (part.get("round_overrides") or {}).items():
            for i, item in enumerate(items):
                left, sep, value = item.partition("=")
                if sep and left.strip() == name and value.strip() in values:
                    items[i] = f"{name}={values[value.strip()]}"
    return recorded


# Keys whose value names code to run ('path/to/file.py:function').
CODE_KEYS = (("toy", "preference"), ("sail", "real", "mask"))


class UntrustedCodeError(PermissionError):
    """A run folder's recorded config names code, and the command was not told to trust it."""


def named_code(recorded: dict) -> dict[str, str]:
    """{key: spec} for each key of a recorded config that names a Python file to run."""
    found = {}
    for path in CODE_KEYS:
        part = recorded
        for key in path:
            part = part.get(key) if isinstance(part, dict) else None
        if isinstance(part, str) and ".py:" in part:
            found[".".join(path)] = part
    return found


def load_recorded_config(run_dir: str | Path, overrides: list[str] | None = None, *, code: str):
    """The RunConfig a run folder recorded (its config.yaml), under today's key names, with ``overrides``.

    A run folder may come from someone else, and its config can name Python files to run (``CODE_KEYS``).
    ``code`` says what to do with them: ``"trust"`` keeps them (the user passed --trust-code), ``"refuse"``
    stops with the keys named, ``"drop"`` unsets them (for commands that never run them: generate, export)."""
    from .config import load_config

    path = RunLayout(run_dir).config
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml); pass the output_dir of a run")
    recorded = current_names(read_yaml(path) or {})
    named = named_code(recorded)
    if named and code == "refuse":
        shown = ", ".join(f"{key}: {spec}" for key, spec in named.items())
        raise UntrustedCodeError(
            f"{path} names code to run ({shown}); reading a run folder never runs its code "
            "unless you say so: pass --trust-code if you trust whoever wrote that file"
        )
    if code == "drop":
        for key in named:
            *parents, last = key.split(".")
            part = recorded
            for parent in parents:
                part = part[parent]
            part[last] = None
    return load_config(recorded, overrides)


def record_config(
    run_dir: str | Path, config: dict, *, resume: bool, allow_change: bool = False, log=None, write: bool = True
) -> None:
    """Write ``config.yaml`` for a new run; on resume, refuse a changed config (the keys and values
    are listed) unless ``allow_change``, which keeps the first config and adds the new one beside it.
    ``write``: False on the ranks other than the main one, which check but leave the writing to it."""
    import yaml

    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)  # a plain training folder keeps its config.yaml where a SAIL run does
    path = layout.config
    if write and (path.exists() or path.is_symlink()):  # the main rank checks; the others may see its writes half-done
        check_run_record(layout, log)
    elif write:
        check_new_run_folder(layout)
    if not (resume and path.is_file()):
        if write:
            atomic_write_text(path, dump_yaml(config))
            write_json(layout.record, version_record() | {"config_sha256": file_sha256(path)})
        return
    changes = config_changes(current_names(yaml.safe_load(path.read_text()) or {}), config)
    if not changes:
        return
    if not allow_change:
        raise ConfigChangedError(
            f"--resume with a config that differs from the one {run_dir} ran with ({path}):\n{describe_changes(changes)}\n"
            "its finished and half-finished stages used the first values. Resume with the same config, start a new "
            "output_dir, or pass --allow-config-change to go on with the new values (both configs are kept)"
        )
    if not write:
        return
    k = 1
    while layout.resumed_config(k).exists():
        k += 1
    atomic_write_text(layout.resumed_config(k), dump_yaml(config))
    if log is not None:
        log(
            f"resumed with a changed config (--allow-config-change), recorded in config.resume-{k}.yaml:\n"
            f"{describe_changes(changes)}"
        )


def check_new_run_folder(layout: RunLayout) -> None:
    """A new run never replaces a file it did not write: none of the files a run writes whole may be there yet."""
    found = [p.name for p in layout.replaced_files() if p.exists() or p.is_symlink()]
    if found:
        raise FolderInUseError(
            f"output_dir {layout.root} holds {', '.join(found)}, which no sail-fast run recorded "
            "there; a run never replaces files it did not write: choose a new or empty output_dir"
        )


def began_before_records(layout: RunLayout) -> bool:
    """A run folder of a sail-fast that wrote no run.json: a finished stage or a training checkpoint is there."""
    return layout.done(RunLayout.BASE).is_file() or bool(TrainingLayout(layout.root).written_checkpoints())


def check_run_record(layout: RunLayout, log=None) -> None:
    """The folder's config.yaml must be the one a sail-fast run wrote (``run.json`` holds its sha256), so a folder
    that merely holds someone's config.yaml is refused, not resumed over; a changed sail-fast version is named."""
    problem = None
    if layout.config.is_symlink() or not layout.config.is_file():
        problem = f"{layout.config} is not a plain file"
    elif not layout.record.is_file() and began_before_records(layout):
        write_json(layout.record, {"config_sha256": file_sha256(layout.config)})
        if log is not None:
            log(
                f"{layout.root} was begun by a sail-fast older than run records; recorded its config.yaml in {layout.record}"
            )
        return
    elif not layout.record.is_file():
        problem = f"it has no {layout.record.name} (the record a run writes beside its config.yaml)"
    else:
        try:
            record = read_json(layout.record)
            recorded_hash = record["config_sha256"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            problem = f"{layout.record} is unreadable ({type(err).__name__}: {err})"
        else:
            if recorded_hash != file_sha256(layout.config):
                problem = (
                    f"{layout.config} is not the file the run recorded in {layout.record.name} (its bytes changed)"
                )
    if problem is not None:
        raise FolderInUseError(
            f"output_dir {layout.root} is not a sail-fast run this command can continue: {problem}; "
            "a run never replaces files it did not write: choose a new or empty output_dir"
        )
    change = describe_version_change(record, version_record())
    if change and log is not None:
        log(change)


def disk_full(err: BaseException, where: Path) -> bool:
    """Whether a failed write ran out of space: said so (errno 28, in any library's words), or the disk is full now."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    if any(mark in str(err) for mark in ("No space left", "os error 28", "code: 28", "StorageFull")):
        return True
    try:
        return shutil.disk_usage(where.parent).free < 2**20
    except OSError:
        return False


def latest_checkpoint(output_dir: str | Path, log=None) -> Path | None:
    """The newest intact checkpoint: finished (half-written ones end in .tmp) and matching its manifest.
    Newer ones that do not match are skipped, with the reason passed to ``log``."""
    for found in reversed(TrainingLayout(output_dir).written_checkpoints()):
        problem = verify_manifest(found)
        if problem is None:
            return found
        if log is not None:
            log(f"skipping checkpoint {found}: {problem}")
    return None


def drop_metrics_after(path: Path, step: int) -> None:
    """The steps after a resumed checkpoint are trained again: drop their logged rows, so none appears twice."""
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        atomic_write_text(path, "".join(row + "\n" for row in rows))
