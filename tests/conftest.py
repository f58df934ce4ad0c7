"""Test-wide settings: offline hubs, and the Triton interpreter when there is no GPU.

Both variables must be set before anything imports triton or huggingface_hub, which is
why they live here and not in the tests.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels still run, in Triton's CPU interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")
