"""The versions a run folder was begun with, and how a resumed run names a change of them (named, not refused:
a newer sail-fast or torch may go on with a run, but its finished stages were made by the earlier ones).

The record also names the kernels torch computes with: the same code and seeds give other numbers to the last
bit on a CPU whose torch kernels are AVX-512 rather than AVX2 (measured: a toy UNet forward differs), and on
another GPU. Such a difference grows through the rounds: each round's candidates come from the last policy."""

from __future__ import annotations

from importlib import metadata

# The packages whose version decides a run's numbers: sail-fast itself, then the libraries it computes with.
PACKAGES = {"sail_fast": "sail-fast", "torch": "torch", "diffusers": "diffusers"}
# And the hardware kernels they run: torch's CPU dispatch level, the GPU where there is one.
MACHINE = {"cpu_capability": "torch CPU kernels", "cuda_device": "GPU"}


def _installed(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def version_record() -> dict:
    """{"sail_fast": ..., "torch": ..., "diffusers": ..., "cpu_capability": ..., "cuda_device": ...}: the versions
    running now (None for one not installed) and the kernels (``cuda_device`` None without a GPU)."""
    import torch

    from .. import (
        __version__,  # the source's own version: an editable install's metadata keeps the one it was installed at
    )

    return {
        "sail_fast": __version__,
        "torch": _installed("torch"),
        "diffusers": _installed("diffusers"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def describe_version_change(recorded: dict, now: dict) -> str | None:
    """One line naming every package version and kernel that differs between ``recorded`` (what the run began
    with) and ``now``; None when none does. Keys either side lacks (a record from before versions were kept) are not compared."""
    names = PACKAGES | MACHINE
    changed = [
        f"{names[key]} {recorded[key]} -> {now[key]}"
        for key in names
        if key in recorded and key in now and recorded[key] != now[key]
    ]
    if not changed:
        return None
    return (
        f"resuming with other versions than the run began with: {', '.join(changed)}; its finished stages "
        "were made by the earlier ones (later stages will differ from an unbroken run, to rounding at first)"
    )
