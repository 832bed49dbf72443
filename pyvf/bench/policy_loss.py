"""The training pass of the lm_head, forward+backward of sum_t c_t log p(t) from hidden
states: policy_loss (one fused pass, 6NHV) against token_logprobs + autograd (8NHV),
full logits, torch.compile chunked, Liger's fused linear cross entropy, Cut
Cross-Entropy with and without its gradient filter and QuACK's chunked linear cross
entropy. TFLOP/s are counted 6NHV for everyone.

Each factory in POLICY_LOSS_IMPLS returns fn(hidden, weight, targets, coeffs) -> scalar
loss, or raises ImportError when the peer is not installed. Liger's fused linear cross
entropy and QuACK's take no per-token coefficients (their gradient is computed for a
plain sum), so they run reduction="sum": the same work, minus the coefficients.

On the CPU the peak memory of each implementation is measured in a fresh process per
implementation (pyvf/bench/memory.py), so the table shows pyvf's O(N + chunk x V)
next to the full logits' N x V from the same run.
"""

from __future__ import annotations

from typing import Callable

import torch

from pyvf.bench import Record, default_dtype, dtype_name, measure, measure_interleaved
from pyvf.bench.memory import fill_cpu_memory
from pyvf.bench.token_logprobs import GPU_SHAPES, lm_head_inputs, logprob_flops
from pyvf.ops import policy_loss, token_logprobs


def _pyvf():
    return lambda h, w, t, c: policy_loss(h, w, t, c)[0]


def _pyvf_token_logprobs():
    return lambda h, w, t, c: (c * token_logprobs(h, w, t)).sum()


def _full_logits():
    def fn(h, w, t, c):
        logp = torch.log_softmax((h @ w.t()).float(), dim=-1).gather(1, t[:, None]).squeeze(1)
        return (c * logp).sum()

    return fn


def _torch_compile_chunked(chunk: int = 4096):
    @torch.compile(dynamic=False)
    def one_chunk(h, w, t, c):
        logp = torch.log_softmax((h @ w.t()).float(), dim=-1).gather(1, t[:, None]).squeeze(1)
        return (c * logp).sum()

    return lambda h, w, t, c: sum(one_chunk(h[i:i + chunk], w, t[i:i + chunk], c[i:i + chunk])
                                  for i in range(0, h.shape[0], chunk))


def _liger():
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return lambda h, w, t, c: -liger_fused_linear_cross_entropy(h, w, t, reduction="sum")


def _quack():
    # QuACK (Dao AI Lab, CuTe DSL kernels for Hopper): chunked linear cross entropy; on
    # SM90 with bf16 and V % 128 == 0 it takes its fused scaled-exp backward. A plain
    # sum, like Liger's, so the same work minus the coefficients.
    from quack.linear_cross_entropy import chunked_linear_cross_entropy

    return lambda h, w, t, c: -chunked_linear_cross_entropy(h, w, t, reduction="sum")


def _cut_cross_entropy(filter_eps):
    def factory():
        from cut_cross_entropy import linear_cross_entropy

        kwargs = {} if filter_eps == "default" else {"filter_eps": filter_eps}
        return lambda h, w, t, c: -(c * linear_cross_entropy(h, w, t, reduction="none", **kwargs).float()).sum()

    return factory


POLICY_LOSS_IMPLS: dict[str, Callable[[], Callable]] = {
    "pyvf": _pyvf,
    "pyvf-token_logprobs": _pyvf_token_logprobs,
    "full-logits": _full_logits,
    "torch-compile-chunked": _torch_compile_chunked,
    "liger-flce": _liger,
    # CCE's default drops gradient terms below a threshold (less work than the others);
    # filter_eps=None does the full backward.
    "cut-cross-entropy": _cut_cross_entropy("default"),
    "cut-cross-entropy-nofilter": _cut_cross_entropy(None),
    "quack-lce": _quack,
}
IMPLS = tuple(POLICY_LOSS_IMPLS)

# The CPU shapes span small calls, where a fixed per-call cost would show, to N = 4096,
# where the full logits take 500 MiB.
CPU_SHAPES = [(n, 128, 32000) for n in (64, 256, 1024, 4096)]
ABOUT = ("policy_loss: forward+backward of sum_t c_t log p(t) from hidden [N, H] and lm_head [V, H]; "
         "TFLOP/s = 6NHV / time for every implementation. CPU: fp32, H=128, V=32000, N=64..4096; "
         "GPU: bf16, V=151936, H in {2048, 4096}, N in {4096, 16384, 65536}. "
         "peak MiB: extra memory of one call (CPU: resident, fresh process per implementation)")


def default_shapes(device: torch.device) -> list[tuple[int, int, int]]:
    return GPU_SHAPES if device.type == "cuda" else CPU_SHAPES


def _case(name, n, h, v, dtype, device):
    """(call, hidden, weight): one forward+backward of implementation `name`."""
    fn = POLICY_LOSS_IMPLS[name]()
    hidden, weight, targets = lm_head_inputs(n, h, v, dtype, device)
    coeffs = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(device)

    def call():
        hidden.grad = weight.grad = None
        fn(hidden, weight, targets, coeffs).backward()

    return call, hidden, weight


def memory_call(impl: str, n: int, h: int, v: int, dtype: str, device: str):
    """The case pyvf/bench/memory.py measures in its fresh process."""
    call, hidden, weight = _case(impl, n, h, v, getattr(torch, dtype), torch.device(device))
    return call, [hidden, weight]


def bench_policy_loss(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device, impls=None,
                      repeats: int = 10, warmup: int = 2,
                      on_record: Callable[[Record], None] | None = None, interleave: bool = False) -> list[Record]:
    """One forward+backward Record per implementation; peers that are missing, fail or
    run out of memory are recorded with a status. `on_record` sees each Record as soon
    as it is measured (the GPU script saves it there, so a timeout keeps it).
    `interleave` times the implementations in turns, one call each per round, so that
    other work on a busy machine slows them alike (no peak memory then: on the CPU it
    is measured in fresh processes, see run)."""
    hidden, weight, targets = lm_head_inputs(n, h, v, dtype, device)
    coeffs = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(device)
    records, calls = [], {}
    for name in impls or POLICY_LOSS_IMPLS:
        rec = Record("policy_loss", name, "fwdbwd", n, h, v, dtype_name(dtype), None, None, None)
        try:
            fn = POLICY_LOSS_IMPLS[name]()
        except ImportError as e:
            rec.status = f"skipped: not installed ({e.name or e})"
        except Exception as e:  # noqa: BLE001 - a peer that is installed but cannot load is a result
            rec.status = f"skipped: cannot load ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
        else:
            def call(fn=fn):
                hidden.grad = weight.grad = None
                fn(hidden, weight, targets, coeffs).backward()

            if interleave:
                calls[name] = (rec, call)
            else:
                measure(rec, call, device, logprob_flops(n, h, v, "fwdbwd"), repeats=repeats, warmup=warmup)
                hidden.grad = weight.grad = None
        records.append(rec)
        if on_record is not None and not interleave:
            on_record(rec)
    if interleave:
        measure_interleaved(list(calls.values()), device, logprob_flops(n, h, v, "fwdbwd"), repeats=repeats,
                            warmup=warmup)
        hidden.grad = weight.grad = None
        if on_record is not None:
            for rec in records:
                on_record(rec)
    return records


def cpu_repeats(n: int) -> int:
    """Timed calls per implementation on the CPU: more for the small, noisier calls,
    within a few minutes for the suite on 2 cores."""
    return 15 if n <= 256 else 9 if n <= 1024 else 5


def run(device: torch.device, sizes: list[int] | None, impls: list[str] | None) -> list[Record]:
    records = []
    shapes = [s for s in default_shapes(device) if sizes is None or s[0] <= max(sizes)]
    for n, h, v in shapes:
        print(f"bench: policy_loss n={n} h={h} v={v}", flush=True)
        if device.type == "cuda":
            records += bench_policy_loss(n, h, v, default_dtype(device), device, impls=impls, repeats=10)
        else:
            records += bench_policy_loss(n, h, v, default_dtype(device), device, impls=impls,
                                         repeats=cpu_repeats(n), interleave=True)
    if device.type == "cpu":
        fill_cpu_memory(records, __name__, lambda r: [r.n, r.h, r.v, r.dtype, "cpu"])
    return records

