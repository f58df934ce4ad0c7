"""What every entry point shares: the flags of a training command, and how a user's mistake ends
a command (one clear line, exit status 2; ``--debug`` for the traceback)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import shlex
import signal
import sys


def add_config_arguments(parser: argparse.ArgumentParser, *, config_default: str | None = None) -> None:
    """--config and --set: every command that reads a run config."""
    parser.add_argument("--config", required=config_default is None, default=config_default,
                        help="YAML run config (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.steps=10 (repeatable)")


def add_run_arguments(parser: argparse.ArgumentParser, *, config_default: str | None = None) -> None:
    """--config, --set, --resume and --allow-config-change: the flags of every command that trains."""
    add_config_arguments(parser, config_default=config_default)
    parser.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last finished stage")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="with --resume: go on although the config differs from the one the run started with "
                             "(both are kept in the run folder)")


def resume_hint(command: list[str]) -> str:
    """How to go on after a stop: the same command line with --resume."""
    words = [w for w in command if w != "--debug"]
    return shlex.join(words if "--resume" in words else [*words, "--resume"])


@contextlib.contextmanager
def user_errors(prog: str, resume_command: list[str] | None = None):
    """A mistake in the config, the data or the run folder ends the command with one clear line (exit 2)
    instead of a traceback; --debug shows the traceback. SIGTERM (exit 143) and Ctrl-C (exit 130) end it with
    one line too, and ``resume_command`` (a command that can --resume) says how to go on."""
    from .config import ConfigError
    from .dpo.trainer import NonFiniteError
    from .interrupts import Stopped, install
    from .rundir import ConfigChangedError, FolderInUseError, RunLockedError

    install()
    go_on = f"; to go on: {resume_hint(resume_command)}" if resume_command else ""
    try:
        yield
    except Stopped as stop:
        sys.stderr.write(f"\n{prog}: {stop}{go_on}\n")
        raise SystemExit(128 + signal.SIGTERM) from None
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{prog}: interrupted (Ctrl-C){go_on}\n")
        raise SystemExit(128 + signal.SIGINT) from None
    except (ConfigError, ConfigChangedError, FolderInUseError, RunLockedError, NonFiniteError, FileNotFoundError,
            FileExistsError, ValueError) as err:
        sys.stderr.write(f"{prog}: error: {err}\n(run with --debug for the traceback)\n")
        raise SystemExit(2) from None
    except OSError as err:
        if err.errno == errno.ENOSPC:
            sys.stderr.write(f"{prog}: error: no space left on {err.filename or 'the device'}: free space or choose "
                             "another output_dir, then rerun with --resume\n")
        else:  # a path the command cannot read or write: which one, and why
            where = f": {err.filename}" if err.filename else ""
            sys.stderr.write(f"{prog}: error: {err.strerror or err}{where}\n(run with --debug for the traceback)\n")
        raise SystemExit(2) from None
