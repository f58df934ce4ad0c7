"""Benchmarks run the compiled code paths, never the Triton interpreter.

    pytest bench/ --benchmark-only --benchmark-json=bench/results/latest.json
    pytest bench/ --benchmark-only --arch sd15        # real SD1.5 UNet shapes (for a GPU)
    pytest bench/ --benchmark-only --arch sdxl        # real SDXL UNet shapes (for a GPU)

Each benchmark compares a naive twin and the fast path on the same models and inputs in
the same run; the ratios are in each benchmark's extra_info and in bench/report.py's table.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

# The suite runs with --import-mode=importlib, which keeps test directories off sys.path;
# the benchmarks share helpers (bench_utils, train_step_variants) from this directory.
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    raise RuntimeError("unset TRITON_INTERPRET before benchmarking: the interpreter is for correctness only")


def pytest_addoption(parser):
    parser.addoption(
        "--arch",
        default="sd15-small",
        choices=["sd15-small", "sd15-medium", "sd15", "sdxl"],
        help="UNet architecture for the model benchmarks (random weights, no download)",
    )


@pytest.fixture(scope="session")
def arch(request):
    return request.config.getoption("--arch")


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
