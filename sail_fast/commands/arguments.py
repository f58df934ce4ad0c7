"""What every entry point shares: the flags of a training command, and how a user's mistake ends
a command (one clear line, exit status 2; ``--debug`` for the traceback)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import shlex
import signal
import sys

# ----------------------------------------------------------------------------- argument types
# argparse names the option in the error ("argument --steps: must be an integer >= 1, got '0'"), so
# a bad value ends the command before any work, in one line.


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """A count or a size: an integer >= 1."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    """A count that may be zero: an integer >= 0."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


SEED_LIMIT = 2**63  # seeds feed torch generators, which take 64-bit values; numpy's SeedSequence refuses negatives


def seed_int(text: str) -> int:
    """A random seed: an integer in [0, 2**63)."""
    value = _integer(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63), got {text!r}")
    return value


def finite_float(text: str) -> float:
    """A number that is neither NaN nor infinite (float() accepts 'nan' and 'inf')."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (a temperature, a memory size)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """A parser whose mistakes end in one line (exit 2), as every other user error does; --help shows the usage.
    Subparsers are made of the same class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(run {self.prog} --help for the options)\n")


def add_config_arguments(parser: argparse.ArgumentParser, *, config_default: str | None = None) -> None:
    """--config and --set: every command that reads a run config."""
    parser.add_argument(
        "--config", required=config_default is None, default=config_default, help="YAML run config (see configs/)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.steps=10 (repeatable)",
    )


def add_run_arguments(parser: argparse.ArgumentParser, *, config_default: str | None = None) -> None:
    """--config, --set, --resume and --allow-config-change: the flags of every command that trains."""
    add_config_arguments(parser, config_default=config_default)
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in output_dir from its last finished stage"
    )
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: go on although the config differs from the one the run started with "
        "(both are kept in the run folder)",
    )


def resume_hint(command: list[str]) -> str:
    """How to go on after a stop: the same command line with --resume."""
    words = [w for w in command if w != "--debug"]
    return shlex.join(words if "--resume" in words else [*words, "--resume"])


# What to do about a full disk, in each command's own words: run and train go on in their output_dir with
# --resume; the others write a folder of their own and are run again.
FULL_DISK_HINTS = {
    "run": "free space or choose another output_dir, then rerun with --resume",
    "train": "free space or choose another output_dir, then rerun with --resume",
    "export": "free space or choose another out folder, then run it again",
    "toy transfer": "free space, then run it again",  # it writes into the experiment folder it reads
    "toy consistency": "free space, then run it again",  # it writes into the run folders it reads
}


def full_disk_hint(command: str) -> str:
    return FULL_DISK_HINTS.get(command, "free space or choose another --out, then run it again")


def stop_hint(resume_command: list[str] | None) -> str:
    """How to go on after SIGTERM or Ctrl-C: a training command resumes; the others are run again."""
    return f"to go on: {resume_hint(resume_command)}" if resume_command else "to go on: run it again"


@contextlib.contextmanager
def user_errors(prog: str, resume_command: list[str] | None = None, command: str = "train"):
    """A mistake in the config, the data or the run folder ends the command with one clear line (exit 2)
    instead of a traceback; --debug shows the traceback. SIGTERM (exit 143) and Ctrl-C (exit 130) end it with
    one line too, and ``resume_command`` (a command that can --resume) says how to go on. ``command``
    (``generate``, ``toy experiment``) picks the words of the hints."""
    from ..dpo.trainer import NonFiniteError
    from ..runs.callables import UserCodeError
    from ..runs.config import ConfigError
    from ..runs.interrupts import Stopped, install
    from ..runs.run_folder import ConfigChangedError, FolderInUseError, RunLockedError

    install()
    go_on = f"; {stop_hint(resume_command)}"
    try:
        yield
    except Stopped as stop:
        sys.stderr.write(f"\n{prog}: {stop}{go_on}\n")
        raise SystemExit(128 + signal.SIGTERM) from None
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{prog}: interrupted (Ctrl-C){go_on}\n")
        raise SystemExit(128 + signal.SIGINT) from None
    except UserCodeError as err:  # the user's own traceback helps them; ours would not
        sys.stderr.write(f"{err.details}{prog}: error: {err}\n")
        raise SystemExit(2) from None
    except (
        ConfigError,
        ConfigChangedError,
        FolderInUseError,
        RunLockedError,
        NonFiniteError,
        FileNotFoundError,
        FileExistsError,
        ValueError,
    ) as err:
        sys.stderr.write(f"{prog}: error: {err}\n(run with --debug for the traceback)\n")
        raise SystemExit(2) from None
    except OSError as err:
        if err.errno == errno.ENOSPC:
            sys.stderr.write(
                f"{prog}: error: no space left on {err.filename or 'the device'}: {full_disk_hint(command)}\n"
            )
        else:  # a path the command cannot read or write: which one, and why
            where = f": {err.filename}" if err.filename else ""
            sys.stderr.write(f"{prog}: error: {err.strerror or err}{where}\n(run with --debug for the traceback)\n")
        raise SystemExit(2) from None
