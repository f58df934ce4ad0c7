"""The one rule for every command that writes a folder of results (``generate --out``, ``eval --out``,
``export OUT``, ``toy pretrain --out``, the toy world's labelled pairs): it writes into a folder that is new,
empty, or one the same command wrote before, and never replaces, deletes or writes through anything it did
not write itself.

Proof, not markers: ``<folder>/.sail-fast-written.jsonl`` is a ledger the command appends to, one line per file
it wrote, with the file's sha256. A file counts as the command's own only while its bytes still match its
ledger line, so a crafted ledger that names a user's file (without knowing its bytes) proves nothing, and a
file changed since it was written is treated as the user's. Every file is written under a fresh temporary
name (``.sail-fast-partial-*``, never an existing one), hashed, entered in the ledger, then renamed into place:
an interrupted command leaves at most a partial file, which it ignores and never deletes, and can be run
again into the same folder. Symbolic links in the folder are never followed. One command at a time holds the
folder (an ``flock`` on ``.sail-fast-written.lock``, released by the kernel when the process ends).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

from .run_folder import FolderInUseError, file_sha256

LEDGER = ".sail-fast-written.jsonl"
LOCK = ".sail-fast-written.lock"
PARTIAL = ".sail-fast-partial-"


class UnwritableFolderError(ValueError):
    """A folder a command must write cannot be made or written (a file in the way, read-only, a system path)."""


def writable_folder(path: str | Path, what: str) -> Path:
    """Make ``path`` (and its parents) and check a file can be written there; one clear error otherwise."""
    path = Path(path)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        where = "is a file" if blocker == path else f"is under {blocker}, which is a file"
        raise UnwritableFolderError(f"{what} {path} {where}, not a folder; choose a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # a probe that cannot collide with any file there
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        raise UnwritableFolderError(
            f"{what} {path} cannot be written ({reason}: {err.filename or path}); choose a folder you can write to"
        ) from None
    return path


def _entries(folder: Path):
    """(relative name, is a symlink) of everything under ``folder``, never following a link."""
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in [*dirs, *files]:
            path = Path(root) / name
            if path.is_symlink() or name in files:
                yield path.relative_to(folder).as_posix(), path.is_symlink()


def _read_ledger(folder: Path) -> tuple[str | None, dict[str, str]]:
    """(the command that wrote the ledger, {file: sha256 of its last write}); a torn last line is skipped."""
    ledger = folder / LEDGER
    if ledger.is_symlink() or not ledger.is_file():
        return None, {}
    command, files = None, {}
    for line in ledger.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        if command is None and isinstance(entry.get("command"), str):
            command = entry["command"]
        elif isinstance(entry.get("file"), str) and isinstance(entry.get("sha256"), str):
            files[entry["file"]] = entry["sha256"]
    return command, files


class OutputFolder:
    """A folder one command fills (see the module docstring). ``write(name)`` gives a path to write ``name`` at."""

    def __init__(self, path: str | Path, command: str, what: str = "--out") -> None:
        self.path, self.command, self.what = Path(path), command, what
        if self.path.is_symlink() or self.path.is_file():
            kind = "a symbolic link" if self.path.is_symlink() else "a file"
            raise UnwritableFolderError(f"{what} {self.path} is {kind}; name a new or empty folder")
        recorded_by, self.files = _read_ledger(self.path) if self.path.is_dir() else (None, {})
        foreign = self._foreign(recorded_by)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise FolderInUseError(
                f"{what} {self.path} holds files `sail-fast {command}` did not write ({shown}); "
                "it never deletes or replaces them: name a new or empty folder"
            )
        writable_folder(self.path, what)
        self._lock = self._take_lock()
        if recorded_by is None:
            self._append({"command": command})

    def _foreign(self, recorded_by: str | None) -> list[str]:
        """Everything in the folder this command cannot prove it wrote."""
        if not self.path.is_dir():
            return []
        foreign = []
        for name, link in _entries(self.path):
            if name in (LEDGER, LOCK) or any(part.startswith(PARTIAL) for part in Path(name).parts):
                continue  # an interrupted write's leftover: ignored, never deleted
            proven = not link and recorded_by == self.command and name in self.files
            if not proven or file_sha256(self.path / name) != self.files[name]:
                foreign.append(name + (" (a symbolic link)" if link else ""))
        if recorded_by not in (None, self.command):
            foreign.insert(0, f"{LEDGER} of `sail-fast {recorded_by}`")
        return sorted(foreign)

    def _take_lock(self):
        lock = open(self.path / LOCK, "a")  # noqa: SIM115 - held for the object's life
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise FolderInUseError(
                f"{self.what} {self.path} is being written by another sail-fast command right now; "
                "wait for it to finish or name another folder"
            ) from None
        return lock

    def _append(self, entry: dict) -> None:
        with open(self.path / LEDGER, "a", encoding="utf-8") as ledger:
            ledger.write(json.dumps(entry) + "\n")
            ledger.flush()
            os.fsync(ledger.fileno())

    def _target(self, name: str | Path) -> tuple[str, Path]:
        name = Path(name).as_posix()
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or not parts or parts[-1] in (LEDGER, LOCK):
            raise ValueError(f"{name!r} is not a file name inside {self.path}")
        target = self.path / name
        for parent in [*reversed(Path(name).parents)][1:]:  # never write through a link placed in the folder
            if (self.path / parent).is_symlink():
                raise FolderInUseError(
                    f"{self.what} {self.path}: {parent} is a symbolic link; sail-fast never writes "
                    "through one: name a new or empty folder"
                )
        target.parent.mkdir(parents=True, exist_ok=True)
        if (target.exists() or target.is_symlink()) and name not in self.files:
            raise FolderInUseError(
                f"{self.what} {self.path}: {name} appeared while `sail-fast {self.command}` was "
                "writing; it never replaces a file it did not write"
            )
        return name, target

    @contextlib.contextmanager
    def write(self, name: str | Path):
        """Yields a fresh temporary path (same suffix) to write ``name`` to; on success it is hashed, entered in
        the ledger and renamed to ``name``. On failure the temporary file is removed."""
        name, target = self._target(name)
        fd, tmp = tempfile.mkstemp(prefix=PARTIAL, suffix="-" + target.name, dir=target.parent)
        os.close(fd)
        tmp = Path(tmp)
        try:
            yield tmp
            self._commit(name, tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)  # made by this process a moment ago (mkstemp): ours to remove
            raise

    def _commit(self, name: str, written: Path, target: Path) -> None:
        digest = file_sha256(written)
        self._append({"file": name, "sha256": digest})
        os.replace(written, target)
        self.files[name] = digest

    def write_text(self, name: str | Path, text: str) -> Path:
        with self.write(name) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return self.path / name

    @contextlib.contextmanager
    def write_tree(self):
        """Yields a fresh temporary folder for writers that choose their own names (``save_pretrained``); each
        file written there is then moved into the folder as ``write`` would. On failure the folder is removed."""
        staging = Path(tempfile.mkdtemp(prefix=PARTIAL, dir=self.path))
        try:
            yield staging
            for name, link in sorted(_entries(staging)):
                if link:
                    raise ValueError(f"a writer left a symbolic link {name} in {staging}; not moved into {self.path}")
                if (staging / name).is_file():
                    _, target = self._target(name)
                    self._commit(name, staging / name, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # made by this process (mkdtemp): ours to remove
