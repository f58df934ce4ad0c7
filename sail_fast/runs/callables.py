"""User code named in a config as ``path/to/file.py:function`` (a toy preference, a saliency model)."""

from __future__ import annotations

import importlib.util
import os
import traceback
from pathlib import Path
from typing import Callable


def load_callable(spec: str, key: str) -> Callable:
    """The function ``spec`` names; ``key`` is the config key, for the error messages."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise ValueError(f"{key} must be 'path/to/file.py:function', got {spec!r}")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{key}: {file} does not exist (expected 'path/to/file.py:function')")
    module_spec = importlib.util.spec_from_file_location(f"_user_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # a syntax error, a failed import, a raise at import: named as the user's code
        raise UserCodeError(f"{key}: {file} failed to load", err, file) from err
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{key}: {file} has no function {name!r}")
    return fn


class UserCodeError(Exception):
    """User code named in a config (``toy.preference``, ``sail.real.mask``) failed to load or raised ``error``.
    ``str()`` is the one line naming the key and ``file``; ``details`` is that code's own traceback."""

    def __init__(self, message: str, error: BaseException, file: str | os.PathLike) -> None:
        super().__init__(f"{message}: {type(error).__name__}: {error} (that code's traceback is above)")
        self.details = user_traceback(error, file)


def user_traceback(error: BaseException, file: str | os.PathLike) -> str:
    """``error``'s traceback from its first frame in ``file`` on: the user's code, not sail-fast's calling it.
    No such frame (a SyntaxError names its file and line itself): the exception alone, or all of it."""
    first, target = error.__traceback__, os.path.realpath(file)
    while first is not None and os.path.realpath(first.tb_frame.f_code.co_filename) != target:
        first = first.tb_next
    if first is None and not isinstance(error, SyntaxError):
        first = error.__traceback__
    return "".join(traceback.format_exception(type(error), error, first))
