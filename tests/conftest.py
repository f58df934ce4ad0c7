"""Test-wide settings: offline hubs, and the Triton interpreter when there is no GPU.

Both variables must be set before anything imports triton or huggingface_hub, which is
why they live here and not in the tests.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels still run, in Triton's CPU interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# With --import-mode=importlib the tests directory is not on sys.path; shared builders live here.
sys.path.insert(0, str(Path(__file__).resolve().parent))
