"""Test-wide settings: offline hubs, the Triton interpreter when there is no GPU, and the tiers.

Both variables must be set before anything imports triton or huggingface_hub, which is
why they live here and not in the tests.

Tiers: the folders mirror the package (kernels/, runs/, commands/, diffusion/, ...); outcomes/ holds the
whole-run tests. ``make test-fast`` is the unit tier (``-m "not slow"``): every test in outcomes/ is slow, and
so is each unit test marked ``@pytest.mark.slow``. ``make test`` runs everything (what CI runs).
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels still run, in Triton's CPU interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest -n (pytest-xdist: make test) the workers share the cores, so each takes its share of torch's
# threads, and the commands the tests launch inherit the same share.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _WORKERS))
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))

# With --import-mode=importlib the test folders are not on sys.path; tests import each other's builders by
# module name (test file names are unique across folders), and helpers/ holds the shared tiny-weight makers.
HERE = Path(__file__).resolve().parent
sys.path[:0] = [
    str(HERE),
    *(str(d) for d in sorted(HERE.iterdir()) if d.is_dir() and not d.name.startswith((".", "_"))),
]


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        if (HERE / "outcomes") in Path(item.fspath).parents:
            item.add_marker(pytest.mark.slow)
