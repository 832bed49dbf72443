"""Per-segment sums of a packed tensor, e.g. per-sequence sums of token log-probs.
Kernels: csrc/group_ops_cpu.cpp and kernels/cuda/group_ops.cu."""

from __future__ import annotations

import torch

from pyvf._native import native
from pyvf.ops._checks import check_1d_floating, check_1d_integer, check_same_device, native_dtype, resolve_backend
from pyvf.ops.reference import segment_sum_reference


def _check_cu_seqlens(cu_seqlens: torch.Tensor, n: int) -> None:
    check_1d_integer("cu_seqlens", cu_seqlens)
    if cu_seqlens.numel() == 0:
        raise ValueError("cu_seqlens must have at least one entry (0)")
    # One device-to-host transfer for all three conditions.
    starts_at_zero, non_decreasing, ends_at_n = torch.stack([
        cu_seqlens[0] == 0,
        (cu_seqlens[1:] >= cu_seqlens[:-1]).all(),
        cu_seqlens[-1] == n,
    ]).tolist()
    if not starts_at_zero:
        raise ValueError(f"cu_seqlens must start at 0, got {int(cu_seqlens[0])}")
    if not non_decreasing:
        raise ValueError("cu_seqlens must be non-decreasing")
    if not ends_at_n:
        raise ValueError(f"cu_seqlens must end at len(values) = {n}, got {int(cu_seqlens[-1])}")


class SegmentSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, cu_seqlens, mask, backend):
        if backend == "reference":
            out = segment_sum_reference(values, cu_seqlens, mask)
        else:
            out = native().segment_sum(native_dtype(values).contiguous(), cu_seqlens, mask)
        ctx.save_for_backward(cu_seqlens, mask)
        ctx.n = values.numel()
        ctx.values_dtype = values.dtype
        return out.to(torch.float64 if values.dtype == torch.float64 else torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        cu_seqlens, mask = ctx.saved_tensors
        grad = torch.repeat_interleave(grad_out, cu_seqlens.diff(), output_size=ctx.n)
        if mask is not None:
            grad = grad * mask
        return grad.to(ctx.values_dtype), None, None, None


def segment_sum(values: torch.Tensor, cu_seqlens: torch.Tensor, *, mask: torch.Tensor | None = None,
                backend: str = "auto") -> torch.Tensor:
    """Sums of values[cu_seqlens[b]:cu_seqlens[b + 1]] (only where `mask`), shape [B].

    float32 output (float64 for float64 values), accumulated in float64.
    Differentiable w.r.t. `values`.
    """
    check_1d_floating("values", values)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != values.shape:
            raise ValueError(f"mask must have the shape of values {tuple(values.shape)}, got {tuple(mask.shape)}")
    check_same_device(values=values, cu_seqlens=cu_seqlens, mask=mask)
    backend = resolve_backend(backend, values.device)
    _check_cu_seqlens(cu_seqlens, values.numel())
    cu = cu_seqlens.to(torch.int64).contiguous()
    return SegmentSum.apply(values, cu, None if mask is None else mask.contiguous(), backend)
