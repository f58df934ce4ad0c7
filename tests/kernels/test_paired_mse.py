"""The fused paired_mse kernel against its plain-torch twin, forward and backward.

On a machine without a GPU the Triton kernels run in Triton's interpreter (conftest.py
sets TRITON_INTERPRET=1), so these tests exercise the real kernel code either way.
"""

import pytest
import torch
from sail_fast.kernels import paired_mse, paired_mse_reference, resolve_backend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Tolerances per input dtype. The forward always accumulates in fp32, so it is tight for
# every dtype (inputs are compared after the same rounding). The backward is written in
# the input dtype: half precision allows about one unit in the last place.
FWD_TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-5, 1e-6), torch.bfloat16: (1e-5, 1e-6)}
BWD_TOL = {torch.float32: (1e-5, 1e-7), torch.float16: (2e-3, 1e-7), torch.bfloat16: (1.6e-2, 1e-7)}

SHAPES = {
    "sd15-latents-NxK": (80, 4, 64, 64),  # N=8 candidates x K=10 draws, SD1.5 latents
    "sdxl-latents": (8, 4, 128, 128),
    "odd-row-length": (5, 3, 37, 41),  # 4551 elements: not a multiple of any block size
    "single-row": (1, 4, 64, 64),
    "flat-rows": (7, 1000),
    "one-element-rows": (6, 1),
}


def _inputs(shape, dtype, *, channels_last=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    target, policy, ref = (torch.randn(shape, generator=gen).to(DEVICE, dtype) for _ in range(3))
    # Policy close to the target, reference further: realistic, and the two MSEs differ.
    policy = target + 0.3 * policy
    if channels_last:
        target, policy, ref = (t.contiguous(memory_format=torch.channels_last) for t in (target, policy, ref))
    return target, policy.detach().requires_grad_(), ref


def _check(target, policy, ref, dtype):
    grad_rows = torch.randn(target.shape[0], generator=torch.Generator().manual_seed(1)).to(DEVICE)
    fused = paired_mse(target, policy, ref, backend="triton")
    expect = paired_mse_reference(target, policy, ref)
    rtol, atol = FWD_TOL[dtype]
    for got, want in zip(fused, expect):
        assert got.dtype == torch.float32 and got.shape == (target.shape[0],)
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    (grad_fused,) = torch.autograd.grad(fused[0], policy, grad_rows)
    (grad_expect,) = torch.autograd.grad(expect[0], policy, grad_rows)
    assert grad_fused.dtype == dtype and grad_fused.shape == policy.shape
    rtol, atol = BWD_TOL[dtype]
    torch.testing.assert_close(grad_fused.float(), grad_expect.float(), rtol=rtol, atol=atol)
    return fused, grad_fused


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference(shape, dtype):
    _check(*_inputs(shape, dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_channels_last_matches_reference_without_copies(dtype):
    target, policy, ref = _inputs((6, 4, 24, 40), dtype, channels_last=True)
    _, grad = _check(target, policy, ref, dtype)
    assert grad.is_contiguous(memory_format=torch.channels_last)


def test_mixed_layouts_give_the_same_answer():
    target, policy, ref = _inputs((4, 3, 10, 12), torch.float32)
    mixed = paired_mse(target.contiguous(memory_format=torch.channels_last), policy, ref, backend="triton")
    plain = paired_mse(target, policy, ref, backend="triton")
    for a, b in zip(mixed, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_broadcast_target_and_row_views():
    # A target shared by every row (stride 0) and a policy that is a strided slice of a
    # larger batch: both are read in place through their row strides.
    gen = torch.Generator().manual_seed(3)
    eps = torch.randn(1, 4, 16, 16, generator=gen).to(DEVICE)
    big = torch.randn(10, 4, 16, 16, generator=gen).to(DEVICE)
    ref = torch.randn(5, 4, 16, 16, generator=gen).to(DEVICE)
    target, policy = eps.expand(5, -1, -1, -1), big[::2]
    fused = paired_mse(target, policy, ref, backend="triton")
    expect = paired_mse_reference(target.contiguous(), policy.contiguous(), ref)
    for a, b in zip(fused, expect):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_mean_not_sum():
    # Every element off by exactly 2: the mean squared error is 4 whatever the row size.
    target = torch.zeros(3, 4, 8, 8, device=DEVICE)
    out = paired_mse(target, target + 2, target - 1, backend="triton")
    torch.testing.assert_close(out[0], torch.full((3,), 4.0, device=DEVICE))
    torch.testing.assert_close(out[1], torch.full((3,), 1.0, device=DEVICE))


def test_backward_formula_is_two_over_d_times_error_times_row_grad():
    target = torch.zeros(2, 5, device=DEVICE)
    policy = torch.arange(10.0, device=DEVICE).reshape(2, 5).requires_grad_()
    ref = torch.zeros(2, 5, device=DEVICE)
    mse_policy, mse_ref = paired_mse(target, policy, ref, backend="triton")
    (mse_policy * torch.tensor([1.0, -3.0], device=DEVICE)).sum().backward()
    expect = 2 / 5 * policy.detach() * torch.tensor([[1.0], [-3.0]], device=DEVICE)
    torch.testing.assert_close(policy.grad, expect)
    assert not mse_ref.requires_grad


def test_cpu_backends_agree():
    target, policy, ref = (t.cpu() for t in _inputs((4, 4, 8, 8), torch.float32))
    eager = paired_mse(target, policy, ref, backend="torch")
    for a, b in zip(eager, paired_mse_reference(target, policy, ref)):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_compiled_reference_matches():
    target, policy, ref = (t.cpu() for t in _inputs((4, 4, 8, 8), torch.float32))
    compiled = paired_mse(target, policy, ref, backend="compiled")
    for a, b in zip(compiled, paired_mse_reference(target, policy, ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_auto_dispatch():
    assert resolve_backend(torch.device("cuda")) == "triton"
    expect_cpu = "triton" if __import__("os").environ.get("TRITON_INTERPRET") == "1" else "torch"
    assert resolve_backend(torch.device("cpu")) == expect_cpu


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_compiled_kernel_large_batch():
    target, policy, ref = _inputs((160, 4, 128, 128), torch.bfloat16)
    _check(target, policy, ref, torch.bfloat16)


class TestBadCalls:
    def test_shape_mismatch(self):
        a = torch.zeros(2, 3)
        with pytest.raises(ValueError, match=r"same shape.*\(2, 3\).*\(2, 4\)"):
            paired_mse(a, torch.zeros(2, 4), a)

    def test_integer_tensor(self):
        a = torch.zeros(2, 3)
        with pytest.raises(ValueError, match="pred_policy has dtype torch.int64"):
            paired_mse(a, torch.zeros(2, 3, dtype=torch.long), a)

    def test_different_devices(self):
        a = torch.zeros(2, 3)
        with pytest.raises(ValueError, match="one device.*cpu.*meta"):
            paired_mse(a, a, torch.zeros(2, 3, device="meta"))

    def test_no_row_dimension(self):
        a = torch.zeros(3)
        with pytest.raises(ValueError, match="at least one dimension after the rows"):
            paired_mse(a, a, a)

    def test_reference_with_grad(self):
        a = torch.zeros(2, 3)
        with pytest.raises(ValueError, match="pred_ref requires grad.*detach"):
            paired_mse(a, a, torch.zeros(2, 3, requires_grad=True))

    def test_unknown_backend(self):
        a = torch.zeros(2, 3)
        with pytest.raises(ValueError, match="unknown backend 'cuda'"):
            paired_mse(a, a, a, backend="cuda")
