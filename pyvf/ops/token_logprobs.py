"""Per-token log-probs (and entropies) straight from hidden states and the lm_head
weight, without the [N, V] logits. Kernels: pyvf/kernels/triton/token_logprobs.py (CUDA
tensors, and CPU tensors under the Triton interpreter) and csrc/token_logprobs_cpu.cpp."""

from __future__ import annotations

import importlib
import math
import os
import sys

import torch

from pyvf._native import native
from pyvf.ops._checks import check_same_device, check_tensor
from pyvf.ops.reference import token_logprobs_reference

BACKENDS = ("auto", "triton", "cpu", "reference")
# Bound on the CPU path's [chunk, V] logits buffer.
CPU_CHUNK_BYTES = 64 * 2**20


def _triton_kernels():
    return importlib.import_module("pyvf.kernels.triton.token_logprobs")


def _check_triton_device(device: torch.device) -> None:
    """Triton runs CPU tensors only in its interpreter, which must be switched on
    before triton is first imported. Without CUDA nothing else could use Triton, so
    pyvf switches it on itself; otherwise the user must."""
    if device.type != "cpu":
        return
    if "triton" not in sys.modules and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(
            "backend='triton' on CPU tensors needs the Triton interpreter, which must be enabled before "
            "triton is imported: set TRITON_INTERPRET=1 in the environment")


class _TritonImpl:
    @staticmethod
    def forward(hidden, weight, targets, inv_temp, with_entropy):
        return _triton_kernels().forward(hidden, weight, targets, inv_temp, with_entropy)

    @staticmethod
    def backward(hidden, weight, targets, lse, entropy, grad_logp, grad_entropy, inv_temp):
        return _triton_kernels().backward(hidden, weight, targets, lse, entropy, grad_logp, grad_entropy,
                                          inv_temp)


class _CpuImpl:
    @staticmethod
    def forward(hidden, weight, targets, inv_temp, with_entropy):
        logp, lse, entropy = native().token_logprobs_forward_cpu(hidden, weight, targets, inv_temp, with_entropy,
                                                                 CPU_CHUNK_BYTES)
        return logp, lse, entropy if with_entropy else None

    @staticmethod
    def backward(hidden, weight, targets, lse, entropy, grad_logp, grad_entropy, inv_temp):
        return native().token_logprobs_backward_cpu(hidden, weight, targets, lse, entropy, grad_logp, grad_entropy,
                                                    inv_temp, CPU_CHUNK_BYTES)


_IMPLS = {"triton": _TritonImpl, "cpu": _CpuImpl}


def _valid_rows(targets: torch.Tensor, ignore_index: int):
    """Indices of the rows that are not ignored, or None when none is (no gather needed)."""
    keep = targets != ignore_index
    rows = keep.nonzero().squeeze(1)
    return None if rows.numel() == targets.numel() else rows


def _forward(impl, hidden, weight, targets, rows, inv_temp, with_entropy):
    """Runs impl on the kept rows; returns full-size outputs and the saved statistics."""
    n = hidden.shape[0]
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    hv = hidden if rows is None else hidden.index_select(0, rows)
    tv = (targets if rows is None else targets.index_select(0, rows)).long().contiguous()
    if tv.numel() == 0:
        logp_v = lse = torch.empty(0, dtype=out_dtype, device=hidden.device)
        ent_v = lse if with_entropy else None
    else:
        logp_v, lse, ent_v = impl.forward(hv, weight, tv, inv_temp, with_entropy)

    def expand(x):
        x = x.to(out_dtype)
        if rows is None:
            return x
        return torch.zeros(n, dtype=out_dtype, device=hidden.device).index_copy_(0, rows, x)

    return expand(logp_v), (expand(ent_v) if with_entropy else None), tv, lse, ent_v


class TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, rows, inv_temp, with_entropy, backend):
        impl = _IMPLS[backend]
        logp, entropy, tv, lse, ent_v = _forward(impl, hidden, weight, targets, rows, inv_temp, with_entropy)
        ctx.save_for_backward(hidden, weight, rows, tv, lse, ent_v)
        ctx.inv_temp = inv_temp
        ctx.impl = impl
        ctx.set_materialize_grads(False)
        if entropy is None:
            return logp
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, rows, tv, lse, ent_v = ctx.saved_tensors
        if tv.numel() == 0 or (grad_logp is None and grad_entropy is None):
            return None, None, None, None, None, None, None

        def kept(g):
            return g if rows is None else g.index_select(0, rows)

        g = kept(grad_logp) if grad_logp is not None else torch.zeros_like(lse)
        ge = kept(grad_entropy) if grad_entropy is not None else None
        hv = hidden if rows is None else hidden.index_select(0, rows)
        d_hv, d_weight = ctx.impl.backward(hv, weight, tv, lse, ent_v, g.contiguous(),
                                           None if ge is None else ge.contiguous(), ctx.inv_temp)
        d_hidden = d_hv if rows is None else torch.zeros_like(hidden).index_copy_(0, rows, d_hv)
        return (d_hidden if ctx.needs_input_grad[0] else None,
                d_weight if ctx.needs_input_grad[1] else None,
                None, None, None, None, None)


def _validate(hidden, weight, targets, temperature, ignore_index):
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        check_tensor(name, t)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, H], got shape {tuple(hidden.shape)}")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be floating point, got {hidden.dtype}")
    n, h = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != h:
        raise ValueError(f"weight must be [V, H] with H = {h} (hidden's last dim), got shape {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one row (V >= 1)")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(f"targets must be 1-D of length N = {n}, got shape {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must have an integer dtype, got {targets.dtype}")
    check_same_device(hidden=hidden, weight=weight, targets=targets)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    v = weight.shape[0]
    bad = ((targets < 0) | (targets >= v)) & (targets != ignore_index)
    if n and bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets[{i}] = {int(targets[i])} is outside [0, {v}) and is not "
                         f"ignore_index ({ignore_index})")


def _resolve_backend(backend: str, hidden: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = hidden.device
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "cpu"
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if backend == "triton":
        if hidden.dtype == torch.float64:
            raise ValueError("hidden dtype float64 is not supported by the triton backend; "
                             "use backend='cpu' (CPU tensors) or 'reference'")
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"backend='triton' needs CUDA tensors (or CPU tensors under the interpreter), "
                             f"got {device}")
        _check_triton_device(device)
    return backend


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   temperature: float = 1.0, ignore_index: int = -100, with_entropy: bool = False,
                   backend: str = "auto"):
    """log pi(targets | hidden) under logits hidden @ weight.T / temperature, shape [N].

    hidden [N, H], weight [V, H] (the lm_head), targets [N] integer. Returns float32
    (float64 for float64 inputs); with `with_entropy` also the entropy of each row's
    distribution. Rows whose target is `ignore_index` give 0, get zero gradient and
    cost no matmul work. Differentiable w.r.t. hidden and weight; the [N, V] logits
    are never materialized (except by backend="reference"). backend: "auto" (Triton
    on CUDA, C++ on CPU), "triton" (on CPU tensors: the Triton interpreter), "cpu",
    "reference".
    """
    _validate(hidden, weight, targets, temperature, ignore_index)
    backend = _resolve_backend(backend, hidden)
    n = hidden.shape[0]
    if backend == "reference":
        out = token_logprobs_reference(hidden, weight, targets, temperature=temperature,
                                       ignore_index=ignore_index, with_entropy=with_entropy)
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        return tuple(o.to(dtype) for o in out) if with_entropy else out.to(dtype)
    if n == 0:
        empty = torch.empty(0, dtype=torch.float32, device=hidden.device)
        return (empty, empty.clone()) if with_entropy else empty

    rows = _valid_rows(targets, ignore_index)
    inv_temp = 1.0 / float(temperature)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return TokenLogprobs.apply(hidden, weight, targets, rows, inv_temp, with_entropy, backend)
    # Nothing to differentiate: run the forward alone and keep nothing for backward.
    logp, entropy, *_ = _forward(_IMPLS[backend], hidden.detach(), weight.detach(), targets, rows, inv_temp,
                                 with_entropy)
    return (logp, entropy) if with_entropy else logp
