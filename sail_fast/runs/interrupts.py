"""Stopping a command cleanly on SIGTERM (how cluster schedulers stop a job) and Ctrl-C.

``install()`` makes SIGTERM raise ``Stopped``, which unwinds every ``with`` block (the run lock is released)
and ends the command with one line saying how to go on (``arguments.stop_hint``: --resume for run and train,
run it again for the others). While DPO trains (inside ``deferred()``) SIGTERM only sets a flag: the trainer
finishes the step it is in, writes a checkpoint when one is quick to write, and then raises ``Stopped``
itself, so the resumed run loses no work.
"""

from __future__ import annotations

import contextlib
import signal
import threading

# A scheduler's SIGKILL follows its SIGTERM after a grace period (Slurm's KillWait: 30 s by default);
# a checkpoint that took longer than this last time is not attempted.
QUICK_CHECKPOINT_S = 20.0


class Stopped(BaseException):
    """SIGTERM stopped the command. A BaseException, as KeyboardInterrupt: no ``except Exception`` swallows it."""


_deferring = 0
_requested = False


def _on_sigterm(signum, frame) -> None:
    global _requested
    if _deferring:
        _requested = True
        return
    raise Stopped("stopped by SIGTERM")


def install() -> None:
    """Route SIGTERM to ``Stopped`` (a no-op off the main thread, where signals cannot be handled)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


@contextlib.contextmanager
def deferred():
    """Inside this block SIGTERM only sets ``requested()``; the block's owner stops at a safe point. A request
    the owner has not acted on stops the command as the block ends."""
    global _deferring, _requested
    _deferring += 1
    try:
        yield
    except BaseException:
        _deferring -= 1
        _requested = _requested and _deferring > 0
        raise
    _deferring -= 1
    if not _deferring and _requested:
        _requested = False
        raise Stopped("stopped by SIGTERM")


def requested() -> bool:
    return _requested
