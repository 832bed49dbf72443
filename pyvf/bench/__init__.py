"""Timing and memory measurement of pyvf's ops against their peers.

`pyvf bench [SUITE ...]` runs suites at sizes that fit the current machine, prints a
table and can write JSON/markdown/PNG. Each suite is one module of this package listed in
`SUITES`; it exposes

    run(device: torch.device, sizes: list[int] | None, impls: list[str] | None) -> list[Record]

and `ABOUT` (one line: its shapes and the FLOP count its TFLOP/s divide by, printed
with its results), and optionally `IMPLS` (the implementation names its `impls` filter accepts). This
module holds what the suites share: timing, peak memory, `Record`, the results format
and `run_suites` (with `add_args` and `main`, the `pyvf bench` command). The pytest-benchmark suites in benchmarks/ import the same implementations,
so every number compares the same code.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from pyvf.options import ConfigError, add_options, from_args, option
from pyvf.packing import Sequence, pack

# Suite name -> module. New suites add a line here.
SUITES: dict[str, str] = {
    "grouped_advantages": "pyvf.bench.advantages",
    "verifree_loss": "pyvf.bench.verifree_loss",
    "token_logprobs": "pyvf.bench.token_logprobs",
    "policy_loss": "pyvf.bench.policy_loss",
    "train_step": "pyvf.bench.train_step",
    "rollout": "pyvf.bench.rollout", "forward": "pyvf.bench.forward", "activations": "pyvf.bench.activations",
    "long_group": "pyvf.bench.long_group", "step": "pyvf.bench.rollout_step",
}
# What `pyvf bench` without a suite runs: policy_loss, the op the trainer uses, first.
DEFAULT_SUITES: tuple[str, ...] = ("policy_loss", "token_logprobs", "grouped_advantages", "verifree_loss",
                                   "train_step")


def load_suite(name: str):
    if name not in SUITES:
        raise ValueError(f"suites: unknown suite {name!r}; choose from {', '.join(SUITES)}")
    return importlib.import_module(SUITES[name])


def suite_impls(suites) -> dict[str, list[str]]:
    """Suite -> the implementation names its `impls` filter accepts (empty when it has none)."""
    return {s: list(getattr(load_suite(s), "IMPLS", ())) for s in suites}

# ---------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_sync = sync


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of fn() in milliseconds, waiting for the device each call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak device memory allocated by one call beyond what was live before it
    (CUDA only; None on the CPU, where the allocator keeps no such count)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU (what training runs), fp32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


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
    tokens_per_s: float | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        return d


def measure(rec: Record, call: Callable[[], object], device: torch.device, flops: float | None = None,
            repeats: int = 10, warmup: int = 2) -> Record:
    """Fills rec's time, TFLOP/s (when flops is given) and peak memory; an implementation
    that runs out of memory or fails is recorded with a status, so one peer failing does
    not hide the others' numbers."""
    try:
        rec.ms = time_ms(call, device, repeats=repeats, warmup=warmup)
        if flops is not None:
            rec.tflops = flops / (rec.ms * 1e-3) / 1e12
        rec.peak_mem_bytes = peak_memory_bytes(call, device)
    except torch.OutOfMemoryError:
        rec.ms = rec.tflops = None
        rec.status = "out of memory"
    except Exception as e:  # noqa: BLE001 - a peer's failure is a result to report
        rec.ms = rec.tflops = None
        rec.status = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rec


def measure_interleaved(cases: list[tuple[Record, Callable[[], object]]], device: torch.device,
                        flops: float | None = None, repeats: int = 10, warmup: int = 2) -> None:
    """Like `measure` for several implementations of one case, timed in turns (one call
    of each per round, median per implementation), so that other work on a shared machine
    slows them alike instead of whichever ran while it was busiest. An implementation
    that fails drops out with its status."""
    live = []
    for rec, call in cases:
        try:
            for _ in range(warmup):
                call()
            sync(device)
            live.append((rec, call, []))
        except Exception as e:  # noqa: BLE001 - a peer's failure is a result to report
            rec.status = ("out of memory" if isinstance(e, torch.OutOfMemoryError) else
                          f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
    for _ in range(repeats):
        for rec, call, times in live:
            if rec.status != "ok":
                continue
            try:
                start = time.perf_counter()
                call()
                sync(device)
                times.append((time.perf_counter() - start) * 1e3)
            except Exception as e:  # noqa: BLE001
                rec.status = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    for rec, _, times in live:
        if rec.status == "ok" and times:
            rec.ms = statistics.median(times)
            if flops is not None:
                rec.tflops = flops / (rec.ms * 1e-3) / 1e12

# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def plot_records(records: list[Record], path: str, op: str = "token_logprobs", pass_: str = "fwdbwd") -> str | None:
    """Time and peak memory against N, one line per implementation (one panel per H)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib not installed, no chart")
        return None
    rows = [r for r in records if r.op == op and r.pass_ == pass_ and r.ms is not None]
    if not rows:
        return None
    hs = sorted({r.h for r in rows})
    fig, axes = plt.subplots(2, len(hs), figsize=(5 * len(hs), 6), squeeze=False)
    for col, h in enumerate(hs):
        for impl in dict.fromkeys(r.impl for r in rows):
            pts = sorted((r.n, r.ms, r.peak_mem_bytes) for r in rows if r.h == h and r.impl == impl)
            axes[0][col].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
            if all(p[2] is not None for p in pts):
                axes[1][col].plot([p[0] for p in pts], [p[2] / 2**30 for p in pts], marker="o", label=impl)
        axes[0][col].set_title(f"{op} {pass_}, H={h}, V={rows[0].v}", fontsize=9)
        axes[0][col].set_ylabel("ms")
        axes[1][col].set_ylabel("peak GiB")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("N (tokens)")
            ax.grid(alpha=0.3)
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    # Suites that report throughput or notes with their "ok" get those columns.
    with_rate = any(r.tokens_per_s for r in records)
    with_notes = any(r.status.startswith("ok;") for r in records)
    head += " tokens/s |" * with_rate + " notes |" * with_notes
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
        if with_rate:
            cells.append(f"{r.tokens_per_s:.0f}" if r.tokens_per_s else "")
        if with_notes:
            cells.append(r.status.removeprefix("ok; ") if r.status.startswith("ok;") else "")
        lines.append("| " + " | ".join([r.op, r.impl, r.pass_, str(r.n), str(r.h), str(r.v), r.dtype] + cells) + " |")
    return "\n".join(lines)


def random_packed_batch(n_seq: int, seq_len: int, vocab: int, group_size: int, device, seed: int = 0):
    """A packed batch of n_seq sequences of seq_len tokens: 20% prompt, 70% reasoning,
    10% answer, random tokens."""

    g = torch.Generator().manual_seed(seed)
    p, a = max(1, seq_len // 5), max(1, seq_len // 10)
    r = seq_len - p - a
    seqs = [Sequence(*(torch.randint(0, vocab, (k,), generator=g).tolist() for k in (p, r, a)), group=i // group_size)
            for i in range(n_seq)]
    return pack(seqs).to(device)


def write_results(records: list[Record], output: str, device: torch.device, command: str,
                  notes: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Writes OUTPUT (JSON), OUTPUT.md and, when matplotlib is there, OUTPUT.png."""
    env = environment(device)
    table = format_table(records)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump({**env, "command": command, "results": [r.to_json() for r in records]}, f, indent=2)
    stem = output.rsplit(".", 1)[0]
    with open(stem + ".md", "w") as f:
        f.write(f"# pyvf bench: {env['device']}, {env['date']}\n\n"
                f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}. "
                f"Command: `{command}`\n\n" + "".join(f"- {n}\n" for n in notes) + f"\n{table}\n")
    written = [output, stem + ".md"]
    op = next((o for o in ("policy_loss", "token_logprobs") if any(r.op == o for r in records)), None)
    if op:
        chart = plot_records(records, stem + ".png", op=op)
        if chart:
            written.append(chart)
    return written


def run_suites(device: str | None, sizes: list[int] | None, output: str | None, impls: list[str] | None = None,
               suites: list[str] | None = None) -> int:
    """Runs `suites` (default: DEFAULT_SUITES) and prints one table. `sizes` bounds the
    batch sizes each suite uses; `impls` filters implementations in the suites that
    have them (a name no chosen suite knows is a ValueError)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    chosen = list(suites or DEFAULT_SUITES)
    modules = {name: load_suite(name) for name in chosen}
    if impls:
        known = {i for m in modules.values() for i in getattr(m, "IMPLS", ())}
        unknown = sorted(set(impls) - known)
        if unknown:
            raise ValueError(f"impls: unknown {', '.join(unknown)} for suites {', '.join(chosen)}; "
                             f"choose from {', '.join(sorted(known))}")
    records: list[Record] = []
    for module in modules.values():
        own = [i for i in impls if i in getattr(module, "IMPLS", ())] if impls else None
        records += module.run(dev, sizes, own)
    env = environment(dev)
    print(f"\ndevice: {env['device']}  torch {env['torch']}  triton {env['triton']}  date {env['date']}")
    for module in modules.values():
        print(f"- {module.ABOUT}")
    print(format_table(records))
    if output:
        command = "pyvf bench" + "".join(f" {s}" for s in (suites or ())) + f" --output {output}"
        written = write_results(records, output, dev, command, [m.ABOUT for m in modules.values()])
        print(f"bench: wrote {', '.join(written)}")
    return 0


HELP = "time the ops at sizes that fit this machine and print a table"


@dataclass
class BenchOptions:
    device: str | None = option(None, "cpu or cuda (none: cuda when available)")
    sizes: str | None = option(None, "comma-separated batch sizes, e.g. 1e4,1e6 (none: by device)")
    output: str | None = option(None, "also write the results as JSON (and .md, .png) to this file")
    impls: str | None = option(None, "comma-separated implementations, each suite keeps the ones it knows "
                                     "(none: all)")
    rollout_mode: str | None = option(None, "the step suite's rollout modes, comma-separated (sync, one_step_off, "
                                            "async; none: all)")


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(float(s)) for s in text.split(",") if s]
    except ValueError:
        raise ConfigError(f"--sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"--sizes must be positive integers, got {text!r}")
    return sizes


def add_args(parser: argparse.ArgumentParser) -> None:
    add_options(parser, BenchOptions)
    parser.add_argument("suites", nargs="*", metavar="SUITE",
                        help=f"suites to run (default: {' '.join(DEFAULT_SUITES)}); one or more of "
                             f"{', '.join(SUITES)}; each prints its shapes and FLOP count with its results")


def main(args: argparse.Namespace) -> int:
    opts = from_args(BenchOptions, args)
    unknown = sorted(set(args.suites) - set(SUITES))
    if unknown:
        raise ConfigError(f"unknown suite {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    impls = opts.impls.split(",") if opts.impls else None
    if opts.rollout_mode:
        impls = (impls or []) + opts.rollout_mode.split(",")
    known = {i for names in suite_impls(args.suites or DEFAULT_SUITES).values() for i in names}
    unknown = sorted(set(impls or []) - known)
    if unknown:
        raise ConfigError(f"unknown --impls {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    sizes = parse_sizes(opts.sizes) if opts.sizes else None
    return run_suites(opts.device, sizes, opts.output, impls, args.suites or None)


# Names the benchmarks/ suites and scripts import from `pyvf.bench`, resolved lazily so
# that importing the package does not import every suite's dependencies.
_MOVED = {
    "LOGPROB_IMPLS": "pyvf.bench.token_logprobs",
    "logprob_flops": "pyvf.bench.token_logprobs",
    "bench_logprobs": "pyvf.bench.token_logprobs",
    "composite_advantages": "pyvf.bench.advantages",
    "bench_groups": "pyvf.bench.advantages",
    "bench_verifree_loss": "pyvf.bench.verifree_loss",
    "QWEN3_SHAPES": "pyvf.bench.train_step",
    "_qwen3": "pyvf.bench.train_step",
    "train_step_fn": "pyvf.bench.train_step",
    "bench_train_step": "pyvf.bench.train_step",
    "longest_trainable": "pyvf.bench.train_step",
    "POLICY_LOSS_IMPLS": "pyvf.bench.policy_loss",
    "bench_policy_loss": "pyvf.bench.policy_loss",
}


def __getattr__(name: str):
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'pyvf.bench' has no attribute {name!r}")
