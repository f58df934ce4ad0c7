"""Triton kernels for ``paired_mse``: one read of target, policy and reference per row.

Import this module only after ``TRITON_INTERPRET`` has its final value: ``triton.jit``
decides at decoration time whether a kernel is compiled or interpreted.

Each row is addressed as ``base + row * row_stride + i`` for ``i < D``; the caller
guarantees that the three tensors lay their rows out in the same element order (both
contiguous or both channels_last), so element ``i`` of each row is the same pixel.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The interpreter runs each program in numpy: few, wide programs are fastest there.
# On a GPU, 1024-wide blocks with 4 warps saturate the memory bus for these streams.
BLOCK = 8192 if INTERPRETED else 1024
NUM_WARPS = 4


@triton.jit
def _paired_mse_fwd_kernel(
    target_ptr,
    policy_ptr,
    ref_ptr,
    partial_ptr,
    target_row_stride,
    policy_row_stride,
    ref_row_stride,
    num_rows,
    row_len,
    chunk_len,
    num_splits,
    BLOCK: tl.constexpr,
):
    # Program (row, split) sums squared errors over one chunk of one row; the host sums
    # the few partials per row, which keeps the result deterministic (no atomics).
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    chunk_start = split * chunk_len
    lanes = tl.arange(0, BLOCK)
    acc_policy = tl.zeros([BLOCK], dtype=tl.float32)
    acc_ref = tl.zeros([BLOCK], dtype=tl.float32)
    for offset in range(0, chunk_len, BLOCK):
        idx = chunk_start + offset + lanes
        mask = idx < row_len
        t = tl.load(target_ptr + row * target_row_stride + idx, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(policy_ptr + row * policy_row_stride + idx, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(ref_ptr + row * ref_row_stride + idx, mask=mask, other=0.0).to(tl.float32)
        dp = p - t
        dr = r - t
        acc_policy += dp * dp
        acc_ref += dr * dr
    out = row * num_splits + split
    tl.store(partial_ptr + out, tl.sum(acc_policy, axis=0))
    tl.store(partial_ptr + num_rows * num_splits + out, tl.sum(acc_ref, axis=0))


@triton.jit
def _paired_mse_bwd_kernel(
    target_ptr,
    policy_ptr,
    grad_row_ptr,
    grad_ptr,
    target_row_stride,
    policy_row_stride,
    grad_row_stride,
    row_len,
    scale,
    BLOCK: tl.constexpr,
):
    # d mse_row / d pred = 2/D * (pred - target); times the incoming per-row gradient.
    row = tl.program_id(0).to(tl.int64)
    idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < row_len
    g = tl.load(grad_row_ptr + row).to(tl.float32) * scale
    t = tl.load(target_ptr + row * target_row_stride + idx, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(policy_ptr + row * policy_row_stride + idx, mask=mask, other=0.0).to(tl.float32)
    grad = (p - t) * g
    tl.store(grad_ptr + row * grad_row_stride + idx, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _num_splits(num_rows: int, row_len: int, device: torch.device) -> int:
    """Split long rows so that a small batch still fills the GPU (about 4 programs per SM)."""
    if device.type != "cuda":
        return 1
    target_programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    max_splits = triton.cdiv(row_len, BLOCK)
    return max(1, min(max_splits, triton.cdiv(target_programs, max(num_rows, 1))))


def paired_mse_forward(
    target: torch.Tensor, policy: torch.Tensor, ref: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    num_rows = policy.shape[0]
    row_len = policy[0].numel()
    splits = _num_splits(num_rows, row_len, policy.device)
    chunk_len = triton.cdiv(triton.cdiv(row_len, splits), BLOCK) * BLOCK
    splits = triton.cdiv(row_len, chunk_len)
    partial = torch.empty(2, num_rows, splits, device=policy.device, dtype=torch.float32)
    _paired_mse_fwd_kernel[(num_rows, splits)](
        target,
        policy,
        ref,
        partial,
        target.stride(0),
        policy.stride(0),
        ref.stride(0),
        num_rows,
        row_len,
        chunk_len,
        splits,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
    mse = partial.sum(dim=2) if splits > 1 else partial.squeeze(2)
    mse = mse / row_len
    return mse[0], mse[1]


def paired_mse_backward(
    target: torch.Tensor, policy: torch.Tensor, grad_rows: torch.Tensor, memory_format: torch.memory_format
) -> torch.Tensor:
    num_rows = policy.shape[0]
    row_len = policy[0].numel()
    grad = torch.empty(policy.shape, dtype=policy.dtype, device=policy.device, memory_format=memory_format)
    grad_rows = grad_rows.to(torch.float32).contiguous()
    _paired_mse_bwd_kernel[(num_rows, triton.cdiv(row_len, BLOCK))](
        target,
        policy,
        grad_rows,
        grad,
        target.stride(0),
        policy.stride(0),
        grad.stride(0),
        row_len,
        2.0 / row_len,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
    return grad
