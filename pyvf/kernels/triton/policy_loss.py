"""policy_loss on CUDA tensors (and CPU tensors under TRITON_INTERPRET=1): the loss
sum_t c_t log p(t) (+ sum_t e_t H_t) with its gradients, in one pass over the vocabulary.

Per chunk of rows (balanced chunks, sized by the workspace bound):

    1. logits = hidden[chunk] @ weight.T         a GEMM with fp32 accumulation, written
                                                 to an fp32 [rows, V] workspace: the
                                                 softmax statistics and dL/dz are computed
                                                 from unrounded logits (bf16 logits lose
                                                 ~3 digits, and the entropy gradient
                                                 log p + H, a difference of numbers near
                                                 10, amplifies that to errors of order 1)
    2. `_policy_rows_kernel`, one program per row: a first sweep over the row builds the
       online log-sum-exp, the entropy (relative to the running max, as in
       token_logprobs) and picks the target logit; a second sweep writes dL/dz in the
       inputs' dtype (to its own buffer; in place for fp32 inputs):

           dL/dz_j = [c (1[j = t] - p_j) - e p_j (log p_j + H)] / T

       (d H / d z_j = -p_j (log p_j + H), since H = lse - sum_j p_j z_j.)
    3. d_hidden[chunk] = dz @ weight; d_weight (+)= dz.T @ hidden[chunk]   (GEMMs)

FLOPs 2NHV + 2NHV + 2NHV = 6NHV, with no recompute of the logits. Memory beyond the
inputs and gradients: the workspace (fp32 logits and, for bf16/fp16 inputs, dz in the
inputs' dtype: 6 bytes per logit, within `workspace_bytes`), an fp32 [V, H] accumulator
for d_weight when more than one chunk is needed (one chunk writes d_weight directly),
and O(N) statistics. On CUDA the d_weight GEMM of a chunk runs on a second stream,
overlapped with the chunk's d_hidden GEMM and the next chunk's logits GEMM and row
kernel (two dz buffers within the same bound).

`policy_rows_reference` is the row kernel's arithmetic in PyTorch: the tests check it
against the kernel (fp32, fp16 under the interpreter), then run the whole chunk loop
with it on bf16 CPU tensors, which emulates what the GPU computes and stores in bf16
(the interpreter's bf16 stores truncate instead of rounding to nearest).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pyvf.kernels.triton.token_logprobs import _add_matmul, _mm_fp32

_NEG_BIG = tl.constexpr(-1.0e30)  # stands in for -inf where inf * 0 would give NaN

# The row kernel streams memory; a wide tile keeps loads vectorized. The interpreter
# pays per operation, so it gets the same tile (fewer Python-level steps).
ROW_BLOCK_V = 2048
ROW_WARPS = 8


@triton.jit
def _policy_rows_kernel(
    z_ptr, dz_ptr,                # [rows, V] logits in (fp32 workspace), dL/dz out (NEED_GRAD; may alias z)
    tgt_ptr, c_ptr, e_ptr,        # targets [rows], coeffs [rows], entropy coeffs [rows] (fp32)
    logp_ptr, ent_ptr,            # out: log-prob and entropy [rows], fp32
    stride_z, stride_dz, inv_temp,
    V: tl.constexpr, NEED_GRAD: tl.constexpr, WITH_ENTROPY_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_z
    out = dz_ptr + row * stride_dz
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
            tl.store(out + cols, (dz * inv_temp).to(dz_ptr.dtype.element_ty), mask=ok)


def policy_rows_reference(z: torch.Tensor, dz: torch.Tensor | None, targets: torch.Tensor, coeffs: torch.Tensor,
                          ecoeffs: torch.Tensor | None, inv_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`_policy_rows_kernel` in PyTorch: (log-probs, entropies) fp32 of logits z [rows, V],
    and, when dz is given, dL/dz written to it (in its dtype, rounded to nearest even as
    the GPU stores it). fp32 arithmetic from z's stored values, as the kernel."""
    zf = z.float() * inv_temp
    logp_all = zf - torch.logsumexp(zf, dim=1, keepdim=True)
    p = logp_all.exp()
    entropy = -(p * logp_all).sum(dim=1)
    logp = logp_all.gather(1, targets.long()[:, None]).squeeze(1)
    if dz is not None:
        c = coeffs.float()[:, None]
        grad = -c * p
        grad.scatter_add_(1, targets.long()[:, None], c)
        if ecoeffs is not None:
            grad -= ecoeffs.float()[:, None] * p * (logp_all + entropy[:, None])
        dz.copy_(grad * inv_temp)
    return logp, entropy


def _launch_rows(z, dz, targets, coeffs, ecoeffs, logp, entropy, inv_temp, need_grad, with_entropy_grad):
    """The row kernel over the rows of z (the seam the bf16 emulation replaces)."""
    _policy_rows_kernel[(z.shape[0],)](
        z, dz if dz is not None else z, targets, coeffs, ecoeffs if ecoeffs is not None else coeffs, logp, entropy,
        z.stride(0), (dz if dz is not None else z).stride(0), inv_temp,
        V=z.shape[1], NEED_GRAD=need_grad, WITH_ENTROPY_GRAD=with_entropy_grad, BLOCK_V=ROW_BLOCK_V,
        num_warps=ROW_WARPS,
    )


# Chunks are balanced and, where there are several, multiples of this many rows (a
# GEMM tile), so no chunk is a thin remainder.
CHUNK_ALIGN = 128


def workspace_bytes_per_row(v: int, dtype: torch.dtype, overlap: bool = False) -> int:
    """Workspace bytes one row of a chunk costs: its fp32 logits, and for bf16/fp16 inputs
    its dz in the inputs' dtype (fp32 dz overwrites the logits in place). With `overlap`
    (two streams) the buffers the side stream reads, the dz, are doubled."""
    element = torch.empty((), dtype=dtype).element_size()
    if dtype == torch.float32:
        return v * 4 * (2 if overlap else 1)
    return v * (4 + element * (2 if overlap else 1))


def chunk_rows(n: int, v: int, dtype: torch.dtype, workspace_bytes: int, overlap: bool = False) -> int:
    """Rows per chunk: as few chunks as the workspace bound allows, of equal size,
    rounded up to CHUNK_ALIGN rows where that stays within the bound."""
    bound = max(1, workspace_bytes // workspace_bytes_per_row(v, dtype, overlap))
    if bound >= n:
        return n
    chunks = -(-n // bound)
    rows = -(-n // chunks)
    aligned = -(-rows // CHUNK_ALIGN) * CHUNK_ALIGN
    return aligned if aligned <= bound else rows


@functools.lru_cache(maxsize=None)
def _side_stream(device_index: int) -> "torch.cuda.Stream":
    """One side stream per device for the d_weight GEMMs: a fresh pool stream per call
    would leave cuBLAS a workspace cached per stream, up to 32 of them."""
    return torch.cuda.Stream(device_index)


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
    ecoeffs = entropy_coeffs.to(**f32).contiguous() if with_entropy_grad else None
    need_grad = need_d_hidden or need_d_weight
    in_place = hidden.dtype == torch.float32 or not need_grad  # dz overwrites the fp32 logits

    # On CUDA with several chunks, the d_weight GEMM of chunk k runs on a side stream
    # while chunk k + 1 computes its logits, dz and d_hidden: the dz buffers (what the
    # side stream reads) are doubled within the same bound.
    overlap = hidden.is_cuda and need_d_weight and chunk_rows(n, v, hidden.dtype, workspace_bytes) < n
    rows = chunk_rows(n, v, hidden.dtype, workspace_bytes, overlap)
    n_dz = 2 if overlap else 1
    logits = [torch.empty((rows, v), **f32) for _ in range(n_dz if in_place else 1)]
    dzs = logits if in_place else [torch.empty((rows, v), dtype=hidden.dtype, device=hidden.device)
                                   for _ in range(n_dz)]
    logp = torch.empty(n, **f32)
    entropy = torch.empty(n, **f32)
    exact = hidden.dtype == torch.float32  # fp32 GEMMs: accumulate d_hidden in K blocks
    d_hidden = torch.empty_like(hidden) if need_d_hidden else None
    one_chunk = rows >= n
    d_weight = None
    if need_d_weight:
        # One chunk: the GEMM writes d_weight once (fp32 accumulation inside the GEMM).
        # Several: partial products add up in fp32, then one rounding to the input dtype.
        d_weight = torch.empty_like(weight) if one_chunk else torch.empty((v, h), **f32)
    main = torch.cuda.current_stream(hidden.device) if overlap else None
    side = _side_stream(hidden.device.index if hidden.device.index is not None else torch.cuda.current_device()) \
        if overlap else None
    freed = [None] * n_dz  # per dz buffer: the event after the side stream's last read of it

    try:
        for k, r0 in enumerate(range(0, n, rows)):
            c = min(rows, n - r0)
            b = k % n_dz
            z, dz = logits[b % len(logits)][:c], dzs[b][:c]
            h_chunk = hidden[r0:r0 + c]
            if in_place and freed[b] is not None:
                main.wait_event(freed[b])  # the logits GEMM overwrites the dz the side stream reads
            _mm_fp32(h_chunk, weight.t(), z)
            if not in_place and freed[b] is not None:
                main.wait_event(freed[b])  # the d_weight GEMM two chunks back still reads this dz
            _launch_rows(z, dz if need_grad else None, targets[r0:r0 + c], coeffs[r0:r0 + c],
                         ecoeffs[r0:r0 + c] if with_entropy_grad else None, logp[r0:r0 + c], entropy[r0:r0 + c],
                         inv_temp, need_grad, with_entropy_grad)
            if need_d_weight:
                if overlap:
                    side.wait_event(main.record_event())  # dz is written
                    with torch.cuda.stream(side):
                        _accumulate_d_weight(d_weight, dz, h_chunk, first=k == 0, exact=exact)
                    freed[b] = side.record_event()
                elif one_chunk:
                    torch.mm(dz.t(), h_chunk, out=d_weight)
                else:
                    _accumulate_d_weight(d_weight, dz, h_chunk, first=k == 0, exact=exact)
            if need_d_hidden:
                out = d_hidden[r0:r0 + c]
                if exact:
                    out.zero_()
                    _add_matmul(out, dz, weight)
                else:
                    torch.mm(dz, weight, out=out)
    finally:
        if overlap:
            main.wait_stream(side)  # before any buffer is freed, also when something raised
    if d_weight is not None:
        d_weight = d_weight.to(weight.dtype)
    return logp, entropy, d_hidden, d_weight


def _accumulate_d_weight(acc: torch.Tensor, dz: torch.Tensor, h_chunk: torch.Tensor, *, first: bool,
                         exact: bool) -> None:
    """acc (fp32) (+)= dz.T @ h_chunk: the first chunk writes acc (no zero-fill), the
    others add."""
    if first and not exact:
        _mm_fp32(dz.t(), h_chunk, acc)
    else:
        if first:
            acc.zero_()
        _add_matmul(acc, dz.t(), h_chunk)
