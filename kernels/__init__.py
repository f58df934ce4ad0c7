"""Fused kernels and their plain-torch reference twins (imported as ``sail_fast.kernels``)."""

if __name__ == "kernels":
    # The repository root is on sys.path (``python -m`` from the root, PYTHONPATH=., the deepspeed
    # launcher), so this folder was found under a name that belongs to the Hugging Face `kernels`
    # package, which transformers and bitsandbytes import. Hand the name to that package, or fail
    # as if nothing were there; importlib returns whatever sys.modules holds after this runs.
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    _root = Path(__file__).resolve().parents[1]
    _elsewhere = [p for p in sys.path if isinstance(p, str) and Path(p or ".").resolve() != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    try:
        _spec.loader.exec_module(_module)
    except BaseException:
        del sys.modules["kernels"]
        raise
else:
    from .paired_mse import paired_mse, resolve_backend, triton_available
    from .preference import dpo_logit, implicit_reward
    from .reference import paired_mse_reference

    __all__ = [
        "dpo_logit",
        "implicit_reward",
        "paired_mse",
        "paired_mse_reference",
        "resolve_backend",
        "triton_available",
    ]
