"""The versions a run folder was begun with, and how a resumed run names a change of them (named, not refused:
a newer sail-fast or torch may go on with a run, but its finished stages were made by the earlier ones)."""

from __future__ import annotations

from importlib import metadata

# The packages whose version decides a run's numbers: sail-fast itself, then the libraries it computes with.
PACKAGES = {"sail_fast": "sail-fast", "torch": "torch", "diffusers": "diffusers"}


def _installed(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def version_record() -> dict:
    """{"sail_fast": ..., "torch": ..., "diffusers": ...}: the versions running now (None for one not installed)."""
    from .. import (
        __version__,  # the source's own version: an editable install's metadata keeps the one it was installed at
    )

    return {"sail_fast": __version__, "torch": _installed("torch"), "diffusers": _installed("diffusers")}


def describe_version_change(recorded: dict, now: dict) -> str | None:
    """One line naming every package whose version differs between ``recorded`` (what the run began with) and
    ``now``; None when none does. Keys either side lacks (a record from before versions were kept) are not compared."""
    changed = [
        f"{PACKAGES.get(key, key)} {recorded[key]} -> {now[key]}"
        for key in PACKAGES
        if key in recorded and key in now and recorded[key] != now[key]
    ]
    if not changed:
        return None
    return (
        f"resuming with other versions than the run began with: {', '.join(changed)}; its finished stages "
        "were made by the earlier ones"
    )
