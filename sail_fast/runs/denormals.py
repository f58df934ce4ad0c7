"""Flushing denormal floats to zero for a block of code, then putting back the setting the process had.

``torch.set_flush_denormal`` sets the calling thread's x86 FTZ/DAZ bits and torch has no getter, so the
setting in force is read by its effect: with denormals-are-zero on, a denormal times one is zero."""

from __future__ import annotations

import contextlib

import torch


def flush_denormal_enabled() -> bool:
    """Whether this thread treats denormal floats as zero (False where the CPU cannot)."""
    return torch.tensor([1e-39], dtype=torch.float32).mul(1.0).item() == 0.0


@contextlib.contextmanager
def flush_denormal(enabled: bool = True):
    """Denormals flushed to zero inside the block when ``enabled`` (a no-op otherwise); the previous
    setting is restored on the way out, also on an exception."""
    if not enabled:
        yield
        return
    before = flush_denormal_enabled()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if not before:
            torch.set_flush_denormal(False)
