"""Per-token log-probs (and entropies) straight from hidden states and the lm_head
weight, without the [N, V] logits. Kernels: pyvf/kernels/triton/token_logprobs.py (CUDA
tensors, and CPU tensors under the Triton interpreter) and csrc/token_logprobs_cpu.cpp."""

from __future__ import annotations

import importlib

import torch

from pyvf._native import native
from pyvf.ops._checks import check_lm_head_inputs
# BACKENDS and CPU_CHUNK_BYTES are shared with policy_loss; they stay importable from here.
from pyvf.ops._lm_head import BACKENDS, CPU_CHUNK_BYTES, resolve_lm_head_backend, valid_rows  # noqa: F401
from pyvf.ops.reference import token_logprobs_reference


def _triton_kernels():
    return importlib.import_module("pyvf.kernels.triton.token_logprobs")


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
    check_lm_head_inputs(hidden, weight, targets, temperature, ignore_index)
    backend = resolve_lm_head_backend(backend, hidden)
    n = hidden.shape[0]
    if backend == "reference":
        out = token_logprobs_reference(hidden, weight, targets, temperature=temperature,
                                       ignore_index=ignore_index, with_entropy=with_entropy)
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        return tuple(o.to(dtype) for o in out) if with_entropy else out.to(dtype)
    if n == 0:
        empty = torch.empty(0, dtype=torch.float32, device=hidden.device)
        return (empty, empty.clone()) if with_entropy else empty

    rows = valid_rows(targets, ignore_index)
    inv_temp = 1.0 / float(temperature)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return TokenLogprobs.apply(hidden, weight, targets, rows, inv_temp, with_entropy, backend)
    # Nothing to differentiate: run the forward alone and keep nothing for backward.
    logp, entropy, *_ = _forward(_IMPLS[backend], hidden.detach(), weight.detach(), targets, rows, inv_temp,
                                 with_entropy)
    return (logp, entropy) if with_entropy else logp
