"""Benchmarks run the compiled code paths: never the Triton interpreter."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    raise RuntimeError("unset TRITON_INTERPRET before benchmarking: the interpreter is for correctness only")
