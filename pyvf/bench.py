"""Timing and memory measurement of pyvf's ops against their peers.

`pyvf bench` runs this at sizes that fit the current machine, prints a table and can
write JSON; the pytest-benchmark suites in benchmarks/ use the same implementations
(`LOGPROB_IMPLS`) so every number compares the same code.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from pyvf.ops import grouped_advantages, segment_sum, token_logprobs

# ---------------------------------------------------------------------------
# Implementations of per-token log-probs from hidden states: pyvf and its peers.
# Each factory returns fn(hidden, weight, targets) -> float32 log-probs [N], or
# raises ImportError when the peer is not installed.
# ---------------------------------------------------------------------------


def _pyvf():
    return lambda h, w, t: token_logprobs(h, w, t)


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
    "torch-eager": _torch_eager,
    "torch-compile-chunked": _torch_compile_chunked,
    "liger-flce": _liger,
    "cut-cross-entropy": _cut_cross_entropy,
}


def logprob_flops(n: int, h: int, v: int, pass_: str) -> float:
    """FLOPs credited to one call: 2NHV forward, 6NHV forward+backward."""
    return (2.0 if pass_ == "fwd" else 6.0) * n * h * v


# ---------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of fn() in milliseconds, waiting for the device each call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak device memory allocated by one call beyond what was live before it
    (CUDA only; None on the CPU, where the allocator keeps no such count)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


@dataclass
class Record:
    op: str
    impl: str
    pass_: str
    n: int
    h: int
    v: int
    dtype: str
    ms: float | None
    tflops: float | None
    peak_mem_bytes: int | None
    status: str = "ok"

    def to_json(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        return d


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
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = (torch.randn(n, h, generator=g) * 1.0).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * (1.0 / h**0.5)).to(device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    records = []
    for name in impls or LOGPROB_IMPLS:
        try:
            fn = LOGPROB_IMPLS[name]()
        except ImportError as e:
            for p in passes:
                records.append(Record("token_logprobs", name, p, n, h, v, str(dtype).replace("torch.", ""),
                                      None, None, None, f"skipped: not installed ({e.name or e})"))
            continue
        for p in passes:
            rec = Record("token_logprobs", name, p, n, h, v, str(dtype).replace("torch.", ""), None, None, None)
            call = _logprob_call(fn, hidden, weight, targets, p)
            try:
                rec.ms = time_ms(call, device, repeats=repeats)
                rec.tflops = logprob_flops(n, h, v, p) / (rec.ms * 1e-3) / 1e12
                rec.peak_mem_bytes = peak_memory_bytes(call, device)
            except torch.OutOfMemoryError:
                rec.status = "out of memory"
            except Exception as e:  # a peer failing must not hide the others' numbers
                rec.status = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            finally:
                hidden.grad = weight.grad = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            records.append(rec)
    return records


def _composite_grpo(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    x = rewards.view(-1, group_size)
    return ((x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-6)).view(-1)


def bench_groups(n: int, device: torch.device, group_size: int = 8) -> list[Record]:
    """grouped_advantages and segment_sum against PyTorch composites, and a copy."""
    rewards = torch.rand(n, device=device)
    out = torch.empty_like(rewards)
    cu = torch.arange(0, n + 1, 512, device=device)
    if int(cu[-1]) != n:
        cu = torch.cat([cu, torch.tensor([n], device=device)])
    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=device), cu.diff())
    cases = [
        ("grouped_advantages", "pyvf", lambda: grouped_advantages(rewards, group_size, estimator="grpo")),
        ("grouped_advantages", "torch-composite", lambda: _composite_grpo(rewards, group_size)),
        ("grouped_advantages", "copy", lambda: out.copy_(rewards)),
        ("segment_sum", "pyvf", lambda: segment_sum(rewards, cu)),
        ("segment_sum", "torch-index_add",
         lambda: torch.zeros(cu.numel() - 1, device=device).index_add_(0, seg, rewards)),
    ]
    return [Record(op, impl, "fwd", n, 0, 0, "float32", time_ms(fn, device, repeats=20), None,
                   peak_memory_bytes(fn, device)) for op, impl, fn in cases]


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
    }


def format_table(records: list[Record]) -> str:
    """Markdown table; the ratio column is the time over pyvf's for the same case."""
    head = "| op | impl | pass | n | h | v | dtype | ms | TFLOP/s | peak MiB | vs pyvf |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    pyvf_ms = {(r.op, r.pass_, r.n, r.h, r.v, r.dtype): r.ms for r in records if r.impl == "pyvf" and r.ms}
    for r in records:
        base = pyvf_ms.get((r.op, r.pass_, r.n, r.h, r.v, r.dtype))
        if r.ms is None:
            cells = [r.status, "", "", ""]
        else:
            cells = [f"{r.ms:.3f}", f"{r.tflops:.1f}" if r.tflops else "",
                     f"{r.peak_mem_bytes / 2**20:.0f}" if r.peak_mem_bytes is not None else "",
                     f"{r.ms / base:.2f}x" if base else ""]
        lines.append("| " + " | ".join([r.op, r.impl, r.pass_, str(r.n), str(r.h), str(r.v), r.dtype] + cells) + " |")
    return "\n".join(lines)


def default_plan(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"group_sizes": [10**4, 10**6, 16 * 10**6],
                "logprob_shapes": [(n, h, 151936) for h in (2048, 4096) for n in (4096, 16384, 65536)],
                "dtype": torch.bfloat16}
    return {"group_sizes": [10**4, 10**5, 10**6], "logprob_shapes": [(256, 128, 32000), (1024, 128, 32000)],
            "dtype": torch.float32}


def main(device: str | None, sizes: list[int] | None, output: str | None, impls: list[str] | None = None) -> int:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    plan = default_plan(dev)
    if sizes is not None:
        plan["group_sizes"] = sizes
        plan["logprob_shapes"] = [(n, h, v) for n, h, v in plan["logprob_shapes"] if n <= max(sizes)]
    records: list[Record] = []
    for n in plan["group_sizes"]:
        print(f"bench: grouped_advantages / segment_sum, n={n}", flush=True)
        records += bench_groups(n, dev)
    for n, h, v in plan["logprob_shapes"]:
        print(f"bench: token_logprobs n={n} h={h} v={v}", flush=True)
        records += bench_logprobs(n, h, v, plan["dtype"], dev, impls=impls)
    env = environment(dev)
    print(f"\ndevice: {env['device']}  torch {env['torch']}  triton {env['triton']}  date {env['date']}")
    print(format_table(records))
    if output:
        with open(output, "w") as f:
            json.dump({**env, "results": [r.to_json() for r in records]}, f, indent=2)
        print(f"bench: wrote {output}")
    return 0
