"""``paired_mse``: the per-row mean squared error of policy and reference predictions
against one shared target, the single reduction behind both the implicit reward
(rows = candidates x draws) and the Diffusion-DPO loss (rows = 2 x pairs).

Dispatch: CUDA tensors take the fused Triton kernels; CPU tensors take the plain-torch
reference, or the Triton kernels under ``TRITON_INTERPRET=1`` (how the tests run them).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from typing import Literal

import torch

from .reference import paired_mse_reference

Backend = Literal["auto", "triton", "torch", "compiled"]
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _triton_impl():
    from . import paired_mse_triton

    return paired_mse_triton


@functools.cache
def _compiled_reference():
    return torch.compile(paired_mse_reference, dynamic=True)


def _validate(target: torch.Tensor, pred_policy: torch.Tensor, pred_ref: torch.Tensor) -> None:
    names = ("target", "pred_policy", "pred_ref")
    tensors = (target, pred_policy, pred_ref)
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"{name} has dtype {t.dtype}; paired_mse takes float32, float16 or bfloat16 "
                f"(cast integer or float64 inputs with .float() first)"
            )
        if t.dim() < 2:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}; expected [B, ...] with at least one dimension after the rows"
            )
    if not (target.shape == pred_policy.shape == pred_ref.shape):
        raise ValueError(
            "target, pred_policy and pred_ref must have the same shape, got "
            f"{tuple(target.shape)}, {tuple(pred_policy.shape)} and {tuple(pred_ref.shape)}"
        )
    if not (target.device == pred_policy.device == pred_ref.device):
        raise ValueError(
            "target, pred_policy and pred_ref must be on one device, got "
            f"{target.device}, {pred_policy.device} and {pred_ref.device}; move them with .to(device)"
        )
    if target[0].numel() == 0:
        raise ValueError(f"rows are empty: shape {tuple(target.shape)} has no elements after the row dimension")
    if torch.is_grad_enabled():
        for name, t in (("pred_ref", pred_ref), ("target", target)):
            if t.requires_grad:
                raise ValueError(
                    f"{name} requires grad, but paired_mse differentiates only w.r.t. pred_policy; "
                    f"compute it under torch.no_grad() or pass {name}.detach()"
                )


def _row_layouts(t: torch.Tensor) -> set[torch.memory_format]:
    """Memory orders in which each row of ``t`` is one dense run of elements."""
    layouts = set()
    rest = t.shape[1:]
    if all(t.stride(d + 1) == math.prod(rest[d + 1 :]) for d in range(len(rest)) if rest[d] > 1):
        layouts.add(torch.contiguous_format)
    if t.dim() == 4:
        c, h, w = rest
        strides = {"c": (c, t.stride(1), 1), "h": (h, t.stride(2), w * c), "w": (w, t.stride(3), c)}
        if all(stride == want for size, stride, want in strides.values() if size > 1):
            layouts.add(torch.channels_last)
    return layouts


def _common_layout(tensors: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], torch.memory_format]:
    """The tensors with rows in one shared element order, copying only when they disagree."""
    shared = set.intersection(*(_row_layouts(t) for t in tensors))
    for layout in (torch.contiguous_format, torch.channels_last):
        if layout in shared:
            return tensors, layout
    return tuple(t.contiguous() for t in tensors), torch.contiguous_format


class _PairedMSETriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, target, pred_policy, pred_ref):
        (target, pred_policy, pred_ref), layout = _common_layout((target, pred_policy, pred_ref))
        mse_policy, mse_ref = _triton_impl().paired_mse_forward(target, pred_policy, pred_ref)
        ctx.save_for_backward(target, pred_policy)
        ctx.layout = layout
        ctx.mark_non_differentiable(mse_ref)
        return mse_policy, mse_ref

    @staticmethod
    def backward(ctx, grad_policy, _grad_ref):
        target, pred_policy = ctx.saved_tensors
        if grad_policy is None or not ctx.needs_input_grad[1]:
            return None, None, None
        grad = _triton_impl().paired_mse_backward(target, pred_policy, grad_policy, ctx.layout)
        return None, grad, None


def resolve_backend(device: torch.device, backend: Backend = "auto") -> str:
    """The implementation ``paired_mse`` will use for tensors on ``device``."""
    if backend not in ("auto", "triton", "torch", "compiled"):
        raise ValueError(f"unknown backend {backend!r}; choose one of auto, triton, torch, compiled")
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if backend == "auto":
        wants_triton = device.type == "cuda" or (device.type == "cpu" and interpret)
        return "triton" if wants_triton and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package: pip install triton")
        if device.type == "cpu" and not _triton_impl().INTERPRETED:
            raise ValueError(
                "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before sail_fast.kernels "
                "is first used; on CPU use backend='torch' or 'compiled' instead"
            )
    return backend


def paired_mse(
    target: torch.Tensor,
    pred_policy: torch.Tensor,
    pred_ref: torch.Tensor,
    *,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean squared errors ``(mse_policy, mse_ref)``, each fp32 of shape [B].

    ``target``, ``pred_policy`` and ``pred_ref`` are [B, ...] tensors of one shape, in
    float32, float16 or bfloat16, contiguous or channels_last; the mean runs over all
    but the first dimension and accumulates in fp32. The result is differentiable with
    respect to ``pred_policy`` only (its gradient comes back in ``pred_policy``'s dtype).
    """
    _validate(target, pred_policy, pred_ref)
    impl = resolve_backend(target.device, backend)
    if impl == "triton":
        return _PairedMSETriton.apply(target, pred_policy, pred_ref)
    if impl == "compiled":
        return _compiled_reference()(target, pred_policy, pred_ref)
    return paired_mse_reference(target, pred_policy, pred_ref)
