"""Triton kernels for per-token log-probs from hidden states, never building [N, V].

Forward (one kernel, `_forward_jit`): each program owns BLOCK_N rows and one
slice of the vocabulary. It walks its slice in BLOCK_V tiles, computes each logits
tile hidden @ weight.T on the tensor cores with fp32 accumulation, and folds it into
an online log-sum-exp (running max m, sum s = sum exp(z - m)) plus, for the entropy,
t = sum exp(z - m) * (z - m). Keeping t relative to the running max keeps the
entropy log(s) - t / s free of the cancellation that lse - sum(p z) suffers at low
entropy. The target's logit is picked out of whichever tile holds it. Slices of the
vocabulary ("splits") let small N still fill every SM; their partial statistics are
merged by `_merge_splits` in O(N * splits).

Backward (per vocabulary chunk of Vc columns, `_logits_grad_jit` + two GEMMs):
the kernel recomputes the logits tile by tile and writes dL/dz straight from its
epilogue into a [N, Vc] workspace (bounded by WORKSPACE_BYTES, never [N, V]):

    dL/dz_ij = g_i (1[j = t_i] - p_ij) - e_i p_ij (z_ij - lse_i + H_i)

(g the upstream gradient of the log-prob, e that of the entropy H), divided by the
temperature. Then d_weight[chunk] = dz^T @ hidden and d_hidden += dz @ weight[chunk]
run as cuBLAS GEMMs with fp32 accumulation; d_hidden is accumulated across chunks in
fp32.

FLOPs, for N rows (after dropping ignored rows), hidden size H, vocabulary V:
    forward            2 N H V   (logits tiles)
    backward           6 N H V   (2 recompute + 2 for d_hidden + 2 for d_weight)
    forward + backward 8 N H V
Benchmarks quote TFLOP/s against the 6 N H V of a method that keeps the logits.

Memory beyond inputs and gradients: O(N * splits) for the forward statistics,
the [N, Vc] workspace and an fp32 [N, H] d_hidden accumulator in backward.

Both kernels take the same code path under TRITON_INTERPRET=1 on CPU tensors, which
is how CI tests them (fp32, fp16; the interpreter's bf16 is unreliable).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Upper bound on the backward's dL/dz workspace, in bytes.
WORKSPACE_BYTES = int(os.environ.get("PYVF_LOGPROBS_WORKSPACE_MB", "512")) * 2**20
# Vocabulary slices are multiples of this, so every autotuned BLOCK_V tiles them.
_SPLIT_ALIGN = 256
_NEG_BIG = tl.constexpr(-1.0e30)  # stands in for -inf where inf * 0 would give NaN

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(block_ns, block_vs, block_ks, warps, stages):
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bv, bk, w, s in zip(block_ns, block_vs, block_ks, warps, stages)
    ]


# Hopper-oriented tiles. Each config here passes `python -m pyvf.kernels.triton.compile_check`
# (sm_90a and sm_80, Triton 3.6 and 3.9): the bf16/fp16 tiles issue wgmma kept in flight across the
# K loop, and no tile spills registers. Dropped for spilling: 128x256x64 in both kernels
# (forward under Triton 3.9; backward with the entropy under 3.6, without it under 3.9)
# and 128x128x128 in the forward (with the entropy, under 3.9).
# fp32 runs exact ("ieee") dots on the FMA units, whose operand tiles live in registers:
# it gets tiles of its own, small enough not to spill (checked for sm_80 and sm_90a).
# The interpreter gets one config with large tiles because it pays per Python-level
# operation, not per FLOP.
if _INTERPRET:
    _FWD_CONFIGS = _configs([16], [256], [64], [4], [1])
    _BWD_CONFIGS = _FWD_CONFIGS
    _FP32_CONFIGS = _FWD_CONFIGS
else:
    _FWD_CONFIGS = _configs(
        [128, 64, 64],
        [128, 256, 128],
        [64, 64, 64],
        [8, 8, 4],
        [4, 4, 4],
    )
    _BWD_CONFIGS = _configs(
        [128, 64, 128, 64],
        [128, 256, 128, 128],
        [64, 64, 128, 64],
        [8, 8, 8, 4],
        [4, 4, 3, 4],
    )
    _FP32_CONFIGS = _configs(
        [64, 64, 128],
        [32, 128, 64],
        [32, 32, 16],
        [4, 8, 8],
        [2, 2, 2],
    )


def _autotune(configs, key):
    def wrap(fn):
        if _INTERPRET:
            return fn  # one config, applied at the call site
        return triton.autotune(configs=configs, key=key)(fn)

    return wrap


def _interpreter_meta(configs):
    """Launch kwargs that an autotuner would otherwise supply."""
    if not _INTERPRET:
        return {}
    c = configs[0]
    return dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)


def kernel_configs(kernel: str, dtype: torch.dtype) -> list:
    """The autotune configs `kernel` ("forward" or "logits_grad") runs with for inputs
    of `dtype` (the compile check judges exactly these)."""
    if dtype == torch.float32:
        return _FP32_CONFIGS
    return {"forward": _FWD_CONFIGS, "logits_grad": _BWD_CONFIGS}[kernel]


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows64, row_ok, cols64, col_ok, H: tl.constexpr, stride_h, stride_w, inv_temp,
                 PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """(hidden[rows] @ weight[cols].T) * inv_temp for one [BLOCK_N, BLOCK_V] tile, fp32."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        a = tl.load(h_ptr + rows64[:, None] * stride_h + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols64[None, :] * stride_w + ks[:, None],
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc * inv_temp


@triton.jit
def _forward_jit(
    h_ptr, w_ptr, tgt_ptr,                  # hidden [N, H], weight [V, H], targets [N]
    m_ptr, s_ptr, t_ptr, tlogit_ptr,        # partial stats [N, S]; target logit [N]
    N, V, H: tl.constexpr, stride_h, stride_w, inv_temp,
    V_PER_SPLIT: tl.constexpr, N_SPLITS,
    WITH_ENTROPY: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # The split varies fastest: the programs resident at once share few row blocks, so
    # their rows of hidden stay in L2 while every split streams its own slice of the
    # weight (row blocks fastest re-read all of hidden from HBM for every weight tile).
    pid = tl.program_id(0)
    pid_n = pid // N_SPLITS
    split = pid % N_SPLITS
    n_splits = N_SPLITS
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    v_lo = split * V_PER_SPLIT
    v_hi = tl.minimum(v_lo + V_PER_SPLIT, V)

    m = tl.full((BLOCK_N,), _NEG_BIG, tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    tlogit = tl.zeros((BLOCK_N,), tl.float32)
    # Loop bounds are constexprs (H, V_PER_SPLIT), never runtime values: Triton 3.6's
    # interpreter turns runtime ints into 1-element arrays that `range` cannot take
    # under NumPy 2. The autotuner keys on both anyway, so this adds no retuning. Only
    # the last split runs past v_hi, by under 256 columns per split (masked).
    for i in range(0, V_PER_SPLIT, BLOCK_V):
        cols = v_lo + i + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        z = _logits_tile(h_ptr, w_ptr, rows64, row_ok, cols.to(tl.int64), col_ok, H, stride_h, stride_w, inv_temp,
                         PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        z = tl.where(col_ok[None, :], z, _NEG_BIG)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        scale = tl.exp(m - m_new)
        d = z - m_new[:, None]
        e = tl.exp(d)
        if WITH_ENTROPY:
            t = scale * (t + (m - m_new) * s) + tl.sum(e * d, axis=1)
        s = s * scale + tl.sum(e, axis=1)
        m = m_new
        tlogit += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)

    out = rows64 * n_splits + split
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(t_ptr + out, t, mask=row_ok)
    tl.store(tlogit_ptr + rows, tlogit, mask=row_ok & (tgt >= v_lo) & (tgt < v_hi))


@triton.jit
def _logits_grad_jit(
    h_ptr, w_ptr, tgt_ptr, lse_ptr, ent_ptr, g_ptr, ge_ptr,   # inputs; ent/ge only WITH_ENTROPY
    dz_ptr,                                                 # out: [N, V_COUNT] workspace
    N, V, H: tl.constexpr, stride_h, stride_w, stride_dz, inv_temp,
    v_start, V_COUNT,
    WITH_ENTROPY: tl.constexpr, PRECISION: tl.constexpr, GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Grouped order (1-D grid): GROUP_N row blocks vary fastest, then the vocabulary
    # block, so the programs resident at once share GROUP_N row blocks of hidden and a
    # few weight tiles, both L2-sized, instead of sweeping every row block per tile.
    pid = tl.program_id(0)
    blocks_n = tl.cdiv(N, BLOCK_N)
    blocks_v = tl.cdiv(V_COUNT, BLOCK_V)
    per_group = GROUP_N * blocks_v
    first_n = (pid // per_group) * GROUP_N
    group_rows = tl.minimum(blocks_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_rows
    pid_v = (pid % per_group) // group_rows
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = v_start + local
    col_ok = (local < V_COUNT) & (cols < V)
    z = _logits_tile(h_ptr, w_ptr, rows64, row_ok, cols.to(tl.int64), col_ok, H, stride_h, stride_w, inv_temp,
                     PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)

    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    p = tl.exp(z - lse[:, None])
    dz = tl.where(cols[None, :] == tgt[:, None], g[:, None], 0.0) - g[:, None] * p
    if WITH_ENTROPY:
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        ge = tl.load(ge_ptr + rows, mask=row_ok, other=0.0)
        dz -= ge[:, None] * p * (z - lse[:, None] + ent[:, None])
    dz = dz * inv_temp
    tl.store(dz_ptr + rows64[:, None] * stride_dz + local[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# One autotuner per config list (tensor-core dtypes, exact fp32) around the same code.
_FWD_KEY = ["H", "V_PER_SPLIT", "WITH_ENTROPY", "PRECISION"]
_BWD_KEY = ["H", "V_COUNT", "WITH_ENTROPY", "PRECISION"]
_forward_kernel = _autotune(_FWD_CONFIGS, _FWD_KEY)(_forward_jit)
_forward_kernel_fp32 = _autotune(_FP32_CONFIGS, _FWD_KEY)(_forward_jit)
_logits_grad_kernel = _autotune(_BWD_CONFIGS, _BWD_KEY)(_logits_grad_jit)
_logits_grad_kernel_fp32 = _autotune(_FP32_CONFIGS, _BWD_KEY)(_logits_grad_jit)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to TF32: the op promises fp32 accuracy.
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def _device_properties(device_index: int) -> tuple[int, int]:
    """(multiprocessors, L2 bytes) of a CUDA device."""
    props = torch.cuda.get_device_properties(device_index)
    return props.multi_processor_count, getattr(props, "L2_cache_size", 50 * 2**20)


# Row blocks of the forward grouped together in the backward's launch order.
GROUP_N = 8
# Largest BLOCK_N of the forward's configs: the split count is planned for it.
_PLAN_BLOCK_N = 128


def vocab_splits(n: int, v: int, sm_count: int, h: int = 4096, element_size: int = 2,
                 l2_bytes: int = 50 * 2**20) -> tuple[int, int]:
    """(vocabulary columns per split, number of splits) for the forward: enough splits
    that the grid fills sm_count multiprocessors twice over, and that the row blocks the
    resident programs share (splits vary fastest) keep their rows of hidden within half
    the L2 (the compile check calls it with a Hopper's numbers)."""
    row_blocks = triton.cdiv(n, _PLAN_BLOCK_N)
    resident = 2 * sm_count
    fill = triton.cdiv(resident, row_blocks)
    rows_in_l2 = max(1, (l2_bytes // 2) // (_PLAN_BLOCK_N * h * element_size))
    reuse = triton.cdiv(resident, rows_in_l2) if row_blocks > rows_in_l2 else 1
    splits = max(1, min(max(fill, reuse), triton.cdiv(v, _SPLIT_ALIGN)))
    per_split = triton.cdiv(triton.cdiv(v, splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    return per_split, triton.cdiv(v, per_split)


def _split_vocab(n: int, v: int, h: int, element_size: int, device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":
        return v, 1
    props = _device_properties(device.index or 0)
    return vocab_splits(n, v, props[0], h, element_size, props[1])


def backward_chunk(n: int, v: int, element_size: int) -> int:
    """Vocabulary columns per backward chunk: the [n, chunk] dL/dz workspace stays
    within WORKSPACE_BYTES, in whole multiples of the split alignment."""
    chunk = max(_SPLIT_ALIGN, (WORKSPACE_BYTES // max(1, n * element_size)) // _SPLIT_ALIGN * _SPLIT_ALIGN)
    return min(chunk, v)


def _merge_splits(m, s, t, with_entropy):
    """Combines per-split (max, sum, relative entropy term) into lse and entropy."""
    big_m = m.max(dim=1, keepdim=True).values
    w = torch.exp(m - big_m)
    total = (s * w).sum(dim=1)
    lse = big_m.squeeze(1) + torch.log(total)
    if not with_entropy:
        return lse, None
    rel = (w * (t + (m - big_m) * s)).sum(dim=1)
    return lse, torch.log(total) - rel / total


def forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, inv_temp: float,
            with_entropy: bool):
    """(log-probs, lse, entropy or None), float32 [N]. Rows must all be valid targets."""
    n, h = hidden.shape
    v = weight.shape[0]
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    per_split, splits = _split_vocab(n, v, h, hidden.element_size(), hidden.device)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    m = torch.empty((n, splits), **f32)
    s = torch.empty((n, splits), **f32)
    t = torch.empty((n, splits), **f32) if with_entropy else m
    tlogit = torch.empty(n, **f32)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * splits,)  # noqa: E731
    kernel = _forward_kernel_fp32 if hidden.dtype == torch.float32 else _forward_kernel
    kernel[grid](
        hidden, weight, targets, m, s, t, tlogit,
        n, v, h, hidden.stride(0), weight.stride(0), inv_temp, per_split, splits,
        WITH_ENTROPY=with_entropy, PRECISION=_precision(hidden.dtype),
        **_interpreter_meta(kernel_configs("forward", hidden.dtype)),
    )
    lse, entropy = _merge_splits(m, s, t, with_entropy)
    return tlogit - lse, lse, entropy


@functools.lru_cache(maxsize=None)
def _out_dtype_works(device_type: str, accumulate: bool) -> bool:
    """Whether this torch runs a bf16 GEMM into an fp32 output without rounding to bf16
    (`mm` / `addmm` with `out_dtype=float32, out=`: CUDA in recent torch); probed once
    per form, in the exact form used below, with a result check."""
    a = torch.ones(2, 2, dtype=torch.bfloat16, device=device_type)
    acc = torch.ones(2, 2, device=device_type)
    try:
        if accumulate:
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        else:
            torch.mm(a, a, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return bool((acc == (3 if accumulate else 2)).all())


def _mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out (fp32) = a @ b with fp32 accumulation and no rounding to a's dtype. Without
    out_dtype support (the CPU) the operands are upcast: products of bf16 or fp16 values
    are exact in fp32, so this is the same fp32-accumulated GEMM."""
    if a.dtype == out.dtype:
        torch.mm(a, b, out=out)
    elif _out_dtype_works(a.device.type, False):
        torch.mm(a, b, out_dtype=out.dtype, out=out)
    else:
        torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)


# Reduction length of one fp32 GEMM before its partial product is added to the result.
_K_BLOCK = 8192


def _add_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, with the product in acc's precision where the GEMM allows it.

    In full precision the reduction runs in blocks of _K_BLOCK: one fp32 GEMM over a
    whole vocabulary (K = 151936) accumulates in runs long enough to cost ~5e-5
    relative error on d_hidden (measured with MKL); K blocks bring it near 2e-6. Each
    block's product is added after the GEMM: addmm_ would fold acc into the GEMM's own
    accumulator and sum all of K in one run again."""
    if a.dtype == acc.dtype:
        if a.shape[1] <= _K_BLOCK:
            acc.addmm_(a, b)
        else:
            for k0 in range(0, a.shape[1], _K_BLOCK):
                acc.add_(a[:, k0:k0 + _K_BLOCK] @ b[k0:k0 + _K_BLOCK])
    elif _out_dtype_works(acc.device.type, True):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.add_(a @ b)


def backward(hidden, weight, targets, lse, entropy, grad_logp, grad_entropy, inv_temp: float):
    """(d_hidden, d_weight) in the inputs' dtypes. grad_entropy may be None."""
    n, h = hidden.shape
    v = weight.shape[0]
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    with_entropy = grad_entropy is not None
    d_weight = torch.empty_like(weight)
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    d_hidden = torch.zeros((n, h), dtype=acc_dtype, device=hidden.device)
    chunk = backward_chunk(n, v, hidden.element_size())
    workspace = torch.empty((n, chunk), dtype=hidden.dtype, device=hidden.device)
    grad_logp = grad_logp.float().contiguous()
    ent_arg = entropy if with_entropy else lse
    ge_arg = grad_entropy.float().contiguous() if with_entropy else grad_logp
    kernel = _logits_grad_kernel_fp32 if hidden.dtype == torch.float32 else _logits_grad_kernel
    for v_start in range(0, v, chunk):
        count = min(chunk, v - v_start)
        dz = workspace[:, :count]
        grid = lambda meta, count=count: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(count, meta["BLOCK_V"]),)  # noqa: E731
        kernel[grid](
            hidden, weight, targets, lse, ent_arg, grad_logp, ge_arg, workspace,
            n, v, h, hidden.stride(0), weight.stride(0), workspace.stride(0), inv_temp,
            v_start, count,
            WITH_ENTROPY=with_entropy, PRECISION=_precision(hidden.dtype), GROUP_N=GROUP_N,
            **_interpreter_meta(kernel_configs("logits_grad", hidden.dtype)),
        )
        torch.mm(dz.t(), hidden, out=d_weight[v_start:v_start + count])
        _add_matmul(d_hidden, dz, weight[v_start:v_start + count])
    return d_hidden.to(hidden.dtype), d_weight
