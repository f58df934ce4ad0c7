"""User code named in a config as ``path/to/file.py:function`` (a toy preference, a saliency model)."""

from __future__ import annotations

import importlib.util
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
    module_spec.loader.exec_module(module)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{key}: {file} has no function {name!r}")
    return fn
