"""The training pass of the lm_head: sum_t c_t log pi(t) (+ sum_t e_t H_t) and its
gradients w.r.t. hidden and weight in one pass per chunk of rows (6NHV FLOPs), because
the coefficients are known before the gradient is needed. Kernels:
pyvf/kernels/triton/policy_loss.py (CUDA tensors, and CPU tensors under the Triton
interpreter) and csrc/policy_loss_cpu.cpp."""

from __future__ import annotations

import importlib
import math

import torch

from pyvf._native import native
from pyvf.ops._checks import check_1d_floating, check_lm_head_inputs, check_same_device
from pyvf.ops._lm_head import CPU_CHUNK_BYTES, resolve_lm_head_backend, valid_rows
from pyvf.ops.reference import policy_loss_reference

# Default bound on the [rows, V] logits workspace of one chunk.
GPU_WORKSPACE_BYTES = 1024 * 2**20
CPU_WORKSPACE_BYTES = CPU_CHUNK_BYTES


def _triton_fused(hidden, weight, targets, coeffs, ecoeffs, inv_temp, need_dh, need_dw, workspace_bytes):
    kernels = importlib.import_module("pyvf.kernels.triton.policy_loss")
    return kernels.fused(hidden, weight, targets, coeffs, ecoeffs, inv_temp, need_dh, need_dw, workspace_bytes)


def _cpu_fused(hidden, weight, targets, coeffs, ecoeffs, inv_temp, need_dh, need_dw, workspace_bytes):
    logp, entropy, d_hidden, d_weight = native().policy_loss_cpu(hidden, weight, targets, coeffs, ecoeffs, inv_temp,
                                                                 need_dh, need_dw, workspace_bytes)
    return logp, entropy, (d_hidden if need_dh else None), (d_weight if need_dw else None)


_FUSED = {"triton": _triton_fused, "cpu": _cpu_fused}


def _run(backend, hidden, weight, targets, coeffs, ecoeffs, rows, inv_temp, need_dh, need_dw, workspace_bytes):
    """Runs the fused pass on the kept rows. Returns (loss, logp, entropy, d_hidden,
    d_weight) with full-size [N] outputs and gradients (None where not asked for)."""
    n = hidden.shape[0]
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32

    def kept(x):
        return x if rows is None else x.index_select(0, rows)

    tv = kept(targets).long().contiguous()
    cv = kept(coeffs)
    ev = kept(ecoeffs) if ecoeffs is not None else None
    if tv.numel() == 0:
        zeros = torch.zeros(n, dtype=out_dtype, device=hidden.device)
        return (torch.zeros((), dtype=out_dtype, device=hidden.device), zeros, zeros.clone(),
                torch.zeros_like(hidden) if need_dh else None, torch.zeros_like(weight) if need_dw else None)
    logp_v, ent_v, d_hv, d_weight = _FUSED[backend](kept(hidden), weight, tv, cv, ev, inv_temp, need_dh, need_dw,
                                                    workspace_bytes)
    # The loss is summed in float64: the coefficients span orders of magnitude.
    loss = (cv.double() * logp_v.double()).sum()
    if ev is not None:
        loss = loss + (ev.double() * ent_v.double()).sum()

    def expand(x):
        x = x.to(out_dtype)
        if rows is None:
            return x
        return torch.zeros(n, dtype=out_dtype, device=hidden.device).index_copy_(0, rows, x)

    d_hidden = None
    if d_hv is not None:
        d_hidden = d_hv if rows is None else torch.zeros_like(hidden).index_copy_(0, rows, d_hv)
    return loss.to(out_dtype), expand(logp_v), expand(ent_v), d_hidden, d_weight


class PolicyLoss(torch.autograd.Function):
    """Forward computes the loss and, for the inputs that need them, its gradients;
    backward only scales them by the incoming gradient (in place, so the gradients are
    not held twice: a second backward through the same graph is an error)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, coeffs, ecoeffs, rows, inv_temp, backend, workspace_bytes):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, logp, entropy, d_hidden, d_weight = _run(backend, hidden, weight, targets, coeffs, ecoeffs, rows,
                                                       inv_temp, need_dh, need_dw, workspace_bytes)
        ctx.grads = (d_hidden, d_weight)
        ctx.mark_non_differentiable(logp, entropy)
        return loss, logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        if ctx.grads is None:
            raise RuntimeError("policy_loss: backward ran twice through the same graph; the gradients are "
                               "computed in forward and handed out once (call policy_loss again)")
        d_hidden, d_weight = ctx.grads
        ctx.grads = None
        # A loss backpropagated on its own arrives with gradient 1, and scaling by it
        # would be a pass over a [V, H] gradient for nothing (1.2 GB at a 151936 x 4096
        # bf16 lm_head). Reading the value on a GPU waits for the work queued before it,
        # which ends with this op's own forward: far cheaper than that pass.
        if grad_loss.numel() == 1 and _can_read(grad_loss) and bool(grad_loss == 1):
            return d_hidden, d_weight, None, None, None, None, None, None, None
        if d_hidden is not None:
            d_hidden.mul_(grad_loss)
        if d_weight is not None:
            d_weight.mul_(grad_loss)
        return d_hidden, d_weight, None, None, None, None, None, None, None


def _can_read(t: torch.Tensor) -> bool:
    """Whether reading t's value is allowed here: not while a CUDA graph is captured or
    torch.compile traces (where it would raise or break the graph)."""
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _check_coeffs(name: str, c, n: int) -> None:
    check_1d_floating(name, c)
    if c.shape[0] != n:
        raise ValueError(f"{name} must have length N = {n} (one per row of hidden), got {c.shape[0]}")
    if c.numel() and not bool(torch.isfinite(c).all()):
        i = int((~torch.isfinite(c)).nonzero()[0, 0])
        raise ValueError(f"{name} must be finite, got {name}[{i}] = {float(c[i])}")


def _workspace_bytes(workspace_mb, device: torch.device) -> int:
    if workspace_mb is None:
        return GPU_WORKSPACE_BYTES if device.type == "cuda" else CPU_WORKSPACE_BYTES
    if isinstance(workspace_mb, bool) or not isinstance(workspace_mb, (int, float)) \
            or not math.isfinite(workspace_mb) or workspace_mb <= 0:
        raise ValueError(f"workspace_mb must be a finite number > 0, got {workspace_mb!r}")
    return max(1, int(workspace_mb * 2**20))


def policy_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, coeffs: torch.Tensor, *,
                temperature: float = 1.0, ignore_index: int = -100, entropy_coeffs: torch.Tensor | None = None,
                workspace_mb: float | None = None, backend: str = "auto"):
    """(loss, logprobs, entropy) for loss = sum_t coeffs[t] * log pi(targets[t]) (+ sum_t
    entropy_coeffs[t] * entropy[t]) under logits hidden @ weight.T / temperature.

    hidden [N, H], weight [V, H] (the lm_head), targets [N] integer, coeffs and
    entropy_coeffs [N] finite floats. `loss` is a 0-dim float32 tensor (float64 for
    float64 inputs), differentiable w.r.t. hidden and weight; `logprobs` and `entropy`
    are detached float32 (float64) [N], entropy always (it comes out of the same pass).
    Rows whose target is `ignore_index` give 0, get zero gradient whatever their
    coefficient and cost no matmul work.

    The gradients are computed in the forward pass, together with the logits (6NHV
    FLOPs, nothing recomputed), and only when needed: under torch.no_grad, or when
    neither hidden nor weight requires grad, only the forward values are computed.
    Backward scales them by the incoming gradient; it can run once per call.

    workspace_mb bounds the [rows, V] logits buffer of one chunk (default 1024 on CUDA,
    64 on the CPU). backend: "auto" (Triton on CUDA, C++ on CPU), "triton" (CPU tensors:
    the Triton interpreter), "cpu", "reference" (float64, materializes the logits).
    """
    check_lm_head_inputs(hidden, weight, targets, temperature, ignore_index)
    n = hidden.shape[0]
    _check_coeffs("coeffs", coeffs, n)
    if entropy_coeffs is not None:
        _check_coeffs("entropy_coeffs", entropy_coeffs, n)
    check_same_device(hidden=hidden, coeffs=coeffs, entropy_coeffs=entropy_coeffs)
    workspace_bytes = _workspace_bytes(workspace_mb, hidden.device)
    backend = resolve_lm_head_backend(backend, hidden)
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if backend == "reference":
        loss, logp, entropy = policy_loss_reference(hidden, weight, targets, coeffs, temperature=temperature,
                                                    ignore_index=ignore_index, entropy_coeffs=entropy_coeffs)
        return loss.to(out_dtype), logp.to(out_dtype), entropy.to(out_dtype)

    rows = valid_rows(targets, ignore_index)
    inv_temp = 1.0 / float(temperature)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return PolicyLoss.apply(hidden, weight, targets, coeffs, entropy_coeffs, rows, inv_temp, backend,
                                workspace_bytes)
    loss, logp, entropy, _, _ = _run(backend, hidden.detach(), weight.detach(), targets, coeffs, entropy_coeffs,
                                     rows, inv_temp, False, False, workspace_bytes)
    return loss, logp, entropy
