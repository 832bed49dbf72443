"""The training pass of the lm_head, forward+backward of sum_t c_t log p(t) from hidden
states: policy_loss (one fused pass, 6NHV) against token_logprobs + autograd (8NHV),
full logits, torch.compile chunked, Liger's fused linear cross entropy, Cut
Cross-Entropy with and without its gradient filter and QuACK's chunked linear cross
entropy. TFLOP/s are counted 6NHV for everyone.

Each factory in POLICY_LOSS_IMPLS returns fn(hidden, weight, targets, coeffs) -> scalar
loss, or raises ImportError when the peer is not installed. Liger's fused linear cross
entropy and QuACK's take no per-token coefficients (their gradient is computed for a
plain sum), so they run reduction="sum": the same work, minus the coefficients.
"""

from __future__ import annotations

from typing import Callable

import torch

from pyvf.bench import Record, default_dtype, dtype_name, measure
from pyvf.bench.token_logprobs import default_shapes, lm_head_inputs, logprob_flops
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


def bench_policy_loss(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device, impls=None,
                      repeats: int = 10, warmup: int = 2,
                      on_record: Callable[[Record], None] | None = None) -> list[Record]:
    """One forward+backward Record per implementation; peers that are missing, fail or
    run out of memory are recorded with a status. `on_record` sees each Record as soon
    as it is measured (the GPU script saves it there, so a timeout keeps it)."""
    hidden, weight, targets = lm_head_inputs(n, h, v, dtype, device)
    coeffs = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(device)
    records = []
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

            measure(rec, call, device, logprob_flops(n, h, v, "fwdbwd"), repeats=repeats, warmup=warmup)
            hidden.grad = weight.grad = None
        records.append(rec)
        if on_record is not None:
            on_record(rec)
    return records


def run(device: torch.device, sizes: list[int] | None, impls: list[str] | None) -> list[Record]:
    records = []
    for n, h, v in default_shapes(device):
        if sizes is not None and n > max(sizes):
            continue
        print(f"bench: policy_loss n={n} h={h} v={v}", flush=True)
        records += bench_policy_loss(n, h, v, default_dtype(device), device, impls=impls,
                                     repeats=10 if device.type == "cuda" else 3)
    return records
