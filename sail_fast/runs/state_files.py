"""Training state (optimizer, LR schedule, EMA, sampler) written as JSON plus safetensors, never pickled.

A run folder may come from someone else, and unpickling a file runs whatever code it names. So nested
state goes to ``<name>.json`` with each tensor replaced by a reference into ``<name>.safetensors``; reading
it back parses JSON and loads raw tensors, and nothing in either file can name code.

What JSON cannot hold as it is gets a small tagged object: tensors (``{"tensor": key}``), tuples
(``{"tuple": [...]}``) and dicts whose keys are not all strings, as optimizer states keyed by parameter index
(``{"items": [[key, value], ...]}``). Floats keep inf and NaN (Python's JSON reads them back).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .run_folder import atomic_save_tensors, atomic_write_text

_TAGS = ("tensor", "tuple", "items")


class StateFileError(ValueError):
    """A state file that cannot be read back as the state this module wrote."""


def _encode(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu()
        return {"tensor": key}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not (len(value) == 1 and next(iter(value), None) in _TAGS):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {"items": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    raise TypeError(
        f"cannot write a {type(value).__name__} into a state file (tensors, numbers, strings, "
        "lists, tuples and dicts only)"
    )


def _decode(value, tensors: dict[str, torch.Tensor], where: str):
    if isinstance(value, list):
        return [_decode(v, tensors, where) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and "tensor" in value:
        if value["tensor"] not in tensors:
            raise StateFileError(f"{where} refers to tensor {value['tensor']!r}, which its .safetensors file lacks")
        return tensors[value["tensor"]]
    if len(value) == 1 and "tuple" in value:
        return tuple(_decode(v, tensors, where) for v in value["tuple"])
    if len(value) == 1 and "items" in value:
        return {_freeze(_decode(k, tensors, where)): _decode(v, tensors, where) for k, v in value["items"]}
    return {k: _decode(v, tensors, where) for k, v in value.items()}


def _freeze(key):
    return tuple(key) if isinstance(key, list) else key


def state_paths(folder: str | Path, name: str) -> tuple[Path, Path]:
    folder = Path(folder)
    return folder / f"{name}.json", folder / f"{name}.safetensors"


def save_state(state: dict, folder: str | Path, name: str) -> None:
    """Write ``state`` as ``<folder>/<name>.json`` and ``<folder>/<name>.safetensors`` (each atomically)."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, tensors)
    text_path, tensor_path = state_paths(folder, name)
    # safetensors refuses tensors that share memory: a tensor whose storage was already seen is copied.
    seen: set[int] = set()
    for key, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen and tensor.numel():
            tensors[key] = tensor.clone()
        seen.add(pointer)
    atomic_save_tensors(tensors, tensor_path)
    atomic_write_text(text_path, json.dumps(encoded) + "\n")


def load_state(folder: str | Path, name: str) -> dict:
    """The state ``save_state`` wrote; a damaged or foreign file is refused in one line naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    text_path, tensor_path = state_paths(folder, name)
    for path in (text_path, tensor_path):
        if not path.is_file():
            raise StateFileError(f"{path} is missing; the checkpoint is incomplete (resume from an earlier one)")
    try:
        encoded = json.loads(text_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise StateFileError(f"{text_path} is not readable JSON ({err}); the checkpoint is damaged") from None
    try:
        tensors = load_file(str(tensor_path))
    except (OSError, SafetensorError) as err:
        raise StateFileError(
            f"{tensor_path} is not a readable safetensors file ({err}); the checkpoint is damaged"
        ) from None
    return _decode(encoded, tensors, str(text_path))
