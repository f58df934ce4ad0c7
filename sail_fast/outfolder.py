"""The one rule for every command that writes a folder of results (``generate --out``, ``eval --out``,
``export OUT``): it writes into a folder that is new, empty, or one the same command wrote before, and never
replaces a file it did not write itself.

What a command wrote is listed in ``<folder>/.sail-fast-out.json`` (the command and its files), and a file
is listed before it is written, so an interrupted command can be run again into the same folder. A folder
holding any file that list does not name, or written by another command, is refused with the names found.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .rundir import FolderInUseError, atomic_write_text

MARKER = ".sail-fast-out.json"


class UnwritableFolderError(ValueError):
    """A folder a command must write cannot be made or written (a file in the way, read-only, a system path)."""


def writable_folder(path: str | Path, what: str) -> Path:
    """Make ``path`` (and its parents) and check a file can be written there; one clear error otherwise."""
    path = Path(path)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        where = "is a file" if blocker == path else f"is under {blocker}, which is a file"
        raise UnwritableFolderError(f"{what} {path} {where}, not a folder; choose a folder path")
    probe = path / f".sail-fast-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        reason = err.strerror or str(err)
        raise UnwritableFolderError(f"{what} {path} cannot be written ({reason}: {err.filename or path}); "
                                    "choose a folder you can write to") from None
    return path


class OutputFolder:
    """A folder one command fills (see the module docstring). ``file(name)`` gives the path to write."""

    def __init__(self, path: str | Path, command: str, what: str = "--out") -> None:
        self.path, self.command = Path(path), command
        if self.path.is_file():
            raise UnwritableFolderError(f"{what} {self.path} is a file; name a new or empty folder")
        listed = self._read_marker()
        found = sorted(str(f.relative_to(self.path)) for f in self.path.rglob("*")
                       if not f.is_dir() and f.name != MARKER) if self.path.is_dir() else []
        foreign = [name for name in found if name not in listed]
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise FolderInUseError(f"{what} {self.path} holds files `sail-fast {command}` did not write ({shown}); "
                                   "it never replaces them: name a new or empty folder")
        writable_folder(self.path, what)
        self.files = [name for name in found if name in listed]
        self._write_marker()

    def _read_marker(self) -> set[str]:
        marker = self.path / MARKER
        if not marker.is_file():
            return set()
        try:
            record = json.loads(marker.read_text())
        except (OSError, ValueError):
            return set()
        return set(record.get("files", [])) if record.get("command") == self.command else set()

    def _write_marker(self) -> None:
        atomic_write_text(self.path / MARKER, json.dumps({"command": self.command, "files": self.files}, indent=1) + "\n")

    def file(self, name: str | Path) -> Path:
        """The path to write ``name`` (relative to the folder) at, listed as this command's first."""
        name = Path(name).as_posix()
        if name not in self.files:
            self.files.append(name)
            self._write_marker()
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def adopt_written(self) -> None:
        """List every file now in the folder as this command's: for writers that choose their own names
        (``save_pretrained``), called right after them."""
        self.files = sorted(str(f.relative_to(self.path)) for f in self.path.rglob("*")
                            if not f.is_dir() and f.name != MARKER)
        self._write_marker()
