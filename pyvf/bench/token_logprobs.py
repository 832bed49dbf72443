"""Per-token log-probs from hidden states: token_logprobs against its peers (full
logits, torch.compile chunked, Liger's fused linear cross entropy, Cut Cross-Entropy).

Each factory in LOGPROB_IMPLS returns fn(hidden, weight, targets) -> float32 log-probs
[N], or raises ImportError when the peer is not installed.
"""

from __future__ import annotations

from typing import Callable

import torch

from pyvf.bench import Record, default_dtype, dtype_name, measure
from pyvf.bench.memory import fill_cpu_memory
from pyvf.ops import token_logprobs


def _pyvf():
    return lambda h, w, t: token_logprobs(h, w, t)


def _pyvf_entropy():
    def fn(h, w, t):
        logp, entropy = token_logprobs(h, w, t, with_entropy=True)
        return logp + entropy  # both outputs reach the loss: entropy costs show up in backward

    return fn


def _torch_eager():
    def fn(h, w, t):
        logits = h @ w.t()
        return torch.log_softmax(logits.float(), dim=-1).gather(1, t[:, None]).squeeze(1)

    return fn


def _torch_compile_chunked(chunk: int = 4096):
    @torch.compile(dynamic=False)
    def one_chunk(h, w, t):
        logits = (h @ w.t()).float()
        return torch.log_softmax(logits, dim=-1).gather(1, t[:, None]).squeeze(1)

    return lambda h, w, t: torch.cat([one_chunk(h[i:i + chunk], w, t[i:i + chunk])
                                      for i in range(0, h.shape[0], chunk)])


def _liger():
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return lambda h, w, t: -liger_fused_linear_cross_entropy(h, w, t, reduction="none").float()


def _cut_cross_entropy():
    from cut_cross_entropy import linear_cross_entropy

    # CCE's defaults, as its users run it (gradient filtering on).
    return lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none").float()


LOGPROB_IMPLS: dict[str, Callable[[], Callable]] = {
    "pyvf": _pyvf,
    "pyvf+entropy": _pyvf_entropy,
    "torch-eager": _torch_eager,
    "torch-compile-chunked": _torch_compile_chunked,
    "liger-flce": _liger,
    "cut-cross-entropy": _cut_cross_entropy,
}
IMPLS = tuple(LOGPROB_IMPLS)


def logprob_flops(n: int, h: int, v: int, pass_: str) -> float:
    """FLOPs credited to one call: 2NHV forward, 6NHV forward+backward."""
    return (2.0 if pass_ == "fwd" else 6.0) * n * h * v


# Standard deviation of the benchmarks' logits, as in the tests (tests/numerics.py): with
# logits of std ~1 every probability stays near 1/V, Cut Cross-Entropy's default gradient
# filter skips most of its backward (about 70% of its 128 x 128 blocks at V = 151936;
# none at std 3) and looks faster than it is on a trained model's logits.
LOGIT_STD = 3.0


def lm_head_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """hidden [n, h] (requires grad), weight [v, h] scaled like an lm_head so that the
    logits have std ~LOGIT_STD (requires grad), targets [n]."""
    # Drawn on the device itself: at the headline shape (a 151936 x 4096 weight) drawing on
    # the host and copying takes seconds of a timed GPU session.
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, device=device) * (LOGIT_STD / h**0.5)).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g, device=device)
    return hidden, weight, targets


def _logprob_call(fn, hidden, weight, targets, pass_):
    if pass_ == "fwd":
        def call():
            with torch.no_grad():
                return fn(hidden, weight, targets)
        return call

    def call():
        hidden.grad = weight.grad = None
        fn(hidden, weight, targets).sum().backward()

    return call


def bench_logprobs(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device, impls=None,
                   passes=("fwd", "fwdbwd"), repeats: int = 10) -> list[Record]:
    """One Record per (implementation, pass); peers that are missing or run out of
    memory are recorded with a status instead of being dropped."""
    hidden, weight, targets = lm_head_inputs(n, h, v, dtype, device)
    records = []
    for name in impls or LOGPROB_IMPLS:
        try:
            fn = LOGPROB_IMPLS[name]()
        except ImportError as e:
            for p in passes:
                records.append(Record("token_logprobs", name, p, n, h, v, dtype_name(dtype),
                                      None, None, None, f"skipped: not installed ({e.name or e})"))
            continue
        for p in passes:
            rec = Record("token_logprobs", name, p, n, h, v, dtype_name(dtype), None, None, None)
            records.append(measure(rec, _logprob_call(fn, hidden, weight, targets, p), device,
                                   logprob_flops(n, h, v, p), repeats=repeats))
            hidden.grad = weight.grad = None
    return records


def memory_call(impl: str, n: int, h: int, v: int, dtype: str, device: str, pass_: str):
    """The case pyvf/bench/memory.py measures in its fresh process."""
    dev = torch.device(device)
    hidden, weight, targets = lm_head_inputs(n, h, v, getattr(torch, dtype), dev)
    return _logprob_call(LOGPROB_IMPLS[impl](), hidden, weight, targets, pass_), [hidden, weight]


ABOUT = ("token_logprobs: log p(target) [N] from hidden [N, H] and lm_head [V, H], forward (fwd) and "
         "forward+backward of their sum (fwdbwd); TFLOP/s = 2NHV (fwd) or 6NHV (fwdbwd) / time. CPU: fp32, "
         "H=128, V=32000, N in {256, 1024}; GPU: bf16, V=151936, H in {2048, 4096}, N in {4096, 16384, 65536}. "
         "peak MiB: extra memory of one call (CPU: resident, fresh process per implementation)")

GPU_SHAPES = [(n, h, 151936) for h in (2048, 4096) for n in (4096, 16384, 65536)]
CPU_SHAPES = [(256, 128, 32000), (1024, 128, 32000)]


def default_shapes(device: torch.device) -> list[tuple[int, int, int]]:
    return GPU_SHAPES if device.type == "cuda" else CPU_SHAPES


def run(device: torch.device, sizes: list[int] | None, impls: list[str] | None) -> list[Record]:
    records = []
    for n, h, v in default_shapes(device):
        if sizes is not None and n > max(sizes):
            continue
        print(f"bench: token_logprobs n={n} h={h} v={v}", flush=True)
        records += bench_logprobs(n, h, v, default_dtype(device), device, impls=impls)
    if device.type == "cpu":
        fill_cpu_memory(records, __name__, lambda r: [r.n, r.h, r.v, r.dtype, "cpu", r.pass_])
    return records
