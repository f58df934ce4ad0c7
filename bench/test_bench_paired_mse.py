"""paired_mse bytes per second against a plain copy of the same bytes, in one run.

    pytest bench/test_bench_paired_mse.py --benchmark-only

Each benchmark records ``gb_per_s`` (bytes moved / median time) in its extra_info; the
copy moves the three inputs' bytes once in and once out, the memory-bandwidth limit.
"""

import pytest
import torch
from sail_fast.kernels import paired_mse, resolve_backend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = {"sd15-8x10": (80, 4, 64, 64), "sdxl-8x10": (80, 4, 128, 128)}


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _inputs(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(shape, generator=gen).to(DEVICE, dtype) for _ in range(3))


def _record(benchmark, fn, bytes_moved):
    def run():
        fn()
        _sync()

    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=3)
    benchmark.extra_info["gb_per_s"] = bytes_moved / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("path", ["copy", "naive", "fused"])
def test_paired_mse_bandwidth(benchmark, path, shape, dtype):
    target, policy, ref = _inputs(shape, dtype)
    nbytes = 3 * target.numel() * target.element_size()
    benchmark.group = f"paired_mse {'x'.join(map(str, shape))} {dtype}"
    if path == "copy":
        src = torch.cat([target, policy, ref])
        dst = torch.empty_like(src)
        _record(benchmark, lambda: dst.copy_(src), 2 * nbytes)
    elif path == "naive":
        _record(benchmark, lambda: paired_mse(target, policy, ref, backend="torch"), nbytes)
    else:
        # The fast path of this device: Triton on CUDA, the compiled reference on CPU.
        backend = "triton" if resolve_backend(DEVICE) == "triton" else "compiled"
        benchmark.extra_info["backend"] = backend
        _record(benchmark, lambda: paired_mse(target, policy, ref, backend=backend), nbytes)
