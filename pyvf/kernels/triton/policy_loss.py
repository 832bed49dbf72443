"""policy_loss on CUDA tensors (and CPU tensors under TRITON_INTERPRET=1): the loss
sum_t c_t log p(t) (+ sum_t e_t H_t) with its gradients, in one pass over the vocabulary.

Per chunk of rows (sized by the workspace bound):

    1. logits = hidden[chunk] @ weight.T         cuBLAS, fp32 accumulate, written once
                                                 to the [rows, V] workspace in the
                                                 inputs' dtype (bf16 on the training path)
    2. `_policy_rows_kernel`, one program per row: a first sweep over the row builds the
       online log-sum-exp, the entropy (relative to the running max, as in
       token_logprobs) and picks the target logit; a second sweep overwrites the row
       in place with dL/dz:

           dL/dz_j = [c (1[j = t] - p_j) - e p_j (log p_j + H)] / T

       (d H / d z_j = -p_j (log p_j + H), since H = lse - sum_j p_j z_j.)
    3. d_hidden[chunk] = dz @ weight; d_weight += dz.T @ hidden[chunk]   (cuBLAS)

FLOPs 2NHV + 2NHV + 2NHV = 6NHV, with no recompute of the logits. Memory: the
workspace, an fp32 [V, H] accumulator for d_weight when more than one chunk is needed
(one chunk writes d_weight directly), and O(N) statistics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyvf.kernels.triton.token_logprobs import _add_matmul

_NEG_BIG = tl.constexpr(-1.0e30)  # stands in for -inf where inf * 0 would give NaN

# The row kernel streams memory; a wide tile keeps loads vectorized. The interpreter
# pays per operation, so it gets the same tile (fewer Python-level steps).
ROW_BLOCK_V = 2048
ROW_WARPS = 8


@triton.jit
def _policy_rows_kernel(
    z_ptr,                        # [rows, V] logits in, dL/dz out (NEED_GRAD), workspace dtype
    tgt_ptr, c_ptr, e_ptr,        # targets [rows], coeffs [rows], entropy coeffs [rows] (fp32)
    logp_ptr, ent_ptr,            # out: log-prob and entropy [rows], fp32
    stride_z, inv_temp,
    V: tl.constexpr, NEED_GRAD: tl.constexpr, WITH_ENTROPY_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_z
    tgt = tl.load(tgt_ptr + row)

    m = tl.full((), _NEG_BIG, tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    # Loop bounds are constexprs: Triton 3.6's interpreter cannot `range` over a runtime int.
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = cols < V
        z = tl.load(base + cols, mask=ok, other=0.0).to(tl.float32) * inv_temp
        z = tl.where(ok, z, _NEG_BIG)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        scale = tl.exp(m - m_new)
        d = z - m_new
        e = tl.exp(d)
        t = scale * (t + (m - m_new) * s) + tl.sum(e * d, axis=0)
        s = s * scale + tl.sum(e, axis=0)
        m = m_new
    log_s = tl.log(s)
    lse = m + log_s
    entropy = log_s - t / s
    logp = tl.load(base + tgt).to(tl.float32) * inv_temp - lse
    tl.store(logp_ptr + row, logp)
    tl.store(ent_ptr + row, entropy)

    if NEED_GRAD:
        c = tl.load(c_ptr + row)
        if WITH_ENTROPY_GRAD:
            ec = tl.load(e_ptr + row)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            ok = cols < V
            logp_j = tl.load(base + cols, mask=ok, other=0.0).to(tl.float32) * inv_temp - lse
            p = tl.exp(logp_j)
            dz = tl.where(cols == tgt, c, 0.0) - c * p
            if WITH_ENTROPY_GRAD:
                dz -= ec * p * (logp_j + entropy)
            tl.store(base + cols, (dz * inv_temp).to(z_ptr.dtype.element_ty), mask=ok)


def workspace_rows(n: int, v: int, dtype: torch.dtype, workspace_bytes: int) -> int:
    """Rows per chunk so the [rows, V] logits workspace stays within workspace_bytes."""
    per_row = v * torch.empty((), dtype=dtype).element_size()
    return max(1, min(n, workspace_bytes // per_row))


def fused(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, coeffs: torch.Tensor,
          entropy_coeffs: torch.Tensor | None, inv_temp: float, need_d_hidden: bool, need_d_weight: bool,
          workspace_bytes: int):
    """(logp, entropy, d_hidden or None, d_weight or None): log-probs and entropies fp32
    [N]; gradients of sum c * logp + sum e * entropy in the inputs' dtypes. All rows
    must have valid targets (the caller drops ignored rows)."""
    n, h = hidden.shape
    v = weight.shape[0]
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    targets = targets.contiguous()
    f32 = dict(dtype=torch.float32, device=hidden.device)
    coeffs = coeffs.to(**f32).contiguous()
    with_entropy_grad = entropy_coeffs is not None
    ecoeffs = entropy_coeffs.to(**f32).contiguous() if with_entropy_grad else coeffs
    need_grad = need_d_hidden or need_d_weight

    rows = workspace_rows(n, v, hidden.dtype, workspace_bytes)
    workspace = torch.empty((rows, v), dtype=hidden.dtype, device=hidden.device)
    logp = torch.empty(n, **f32)
    entropy = torch.empty(n, **f32)
    exact = hidden.dtype == torch.float32  # fp32 GEMMs: accumulate d_hidden in K blocks
    d_hidden = torch.empty_like(hidden) if need_d_hidden else None
    d_weight = None
    if need_d_weight:
        # One chunk: the GEMM writes d_weight once (fp32 accumulation inside cuBLAS).
        # Several: partial products add up in fp32, then one rounding to the input dtype.
        d_weight = torch.empty_like(weight) if rows >= n else torch.zeros((v, h), **f32)
    for r0 in range(0, n, rows):
        c = min(rows, n - r0)
        z = workspace[:c]
        h_chunk = hidden[r0:r0 + c]
        torch.mm(h_chunk, weight.t(), out=z)
        _policy_rows_kernel[(c,)](
            z, targets[r0:r0 + c], coeffs[r0:r0 + c], ecoeffs[r0:r0 + c], logp[r0:r0 + c], entropy[r0:r0 + c],
            z.stride(0), inv_temp,
            V=v, NEED_GRAD=need_grad, WITH_ENTROPY_GRAD=with_entropy_grad, BLOCK_V=ROW_BLOCK_V,
            num_warps=ROW_WARPS,
        )
        if need_d_hidden:
            out = d_hidden[r0:r0 + c]
            if exact:
                out.zero_()
                _add_matmul(out, z, weight)
            else:
                torch.mm(z, weight, out=out)
        if need_d_weight:
            if rows >= n:
                torch.mm(z.t(), h_chunk, out=d_weight)
            else:
                _add_matmul(d_weight, z.t(), h_chunk)
    if d_weight is not None:
        d_weight = d_weight.to(weight.dtype)
    return logp, entropy, d_hidden, d_weight

