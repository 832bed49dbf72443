"""`pyvf bench`: times the ops at sizes that fit the current machine and prints a
table (optionally JSON). The pytest-benchmark suites in benchmarks/ are the fuller
measurement; this is the quick look."""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from pyvf.ops import grouped_advantages, segment_sum


@dataclass
class Record:
    op: str
    impl: str
    n: int
    ms: float


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of fn() in milliseconds, waiting for the device each call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _composite_grpo(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    x = rewards.view(-1, group_size)
    return ((x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-6)).view(-1)


def run(device: torch.device, sizes: list[int], progress: Callable[[str], None] = print) -> list[Record]:
    records = []
    group_size = 8
    for n in sizes:
        progress(f"bench: n={n}")
        rewards = torch.rand(n, device=device)
        records.append(Record("grouped_advantages", "pyvf", n, time_ms(
            lambda: grouped_advantages(rewards, group_size, estimator="grpo"), device)))
        records.append(Record("grouped_advantages", "torch-composite", n, time_ms(
            lambda: _composite_grpo(rewards, group_size), device)))
        cu = torch.arange(0, n + 1, 512, device=device)
        if cu[-1] != n:
            cu = torch.cat([cu, torch.tensor([n], device=device)])
        records.append(Record("segment_sum", "pyvf", n, time_ms(lambda: segment_sum(rewards, cu), device)))
        seg = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=device), cu.diff())
        records.append(Record("segment_sum", "torch-index_add", n, time_ms(
            lambda: torch.zeros(cu.numel() - 1, device=device).index_add_(0, seg, rewards), device)))
    return records


def format_table(records: list[Record]) -> str:
    lines = [f"{'op':<20} {'impl':<18} {'n':>10} {'ms':>10} {'vs pyvf':>8}"]
    pyvf_ms = {(r.op, r.n): r.ms for r in records if r.impl == "pyvf"}
    for r in records:
        ratio = r.ms / pyvf_ms[(r.op, r.n)]
        lines.append(f"{r.op:<20} {r.impl:<18} {r.n:>10} {r.ms:>10.4f} {ratio:>7.2f}x")
    return "\n".join(lines)


def main(device: str | None, sizes: list[int] | None, output: str | None) -> int:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if sizes is None:
        sizes = [10**4, 10**5, 10**6] + ([16 * 10**6] if dev.type == "cuda" else [])
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    records = run(dev, sizes)
    print(f"device: {name}  torch {torch.__version__}")
    print(format_table(records))
    if output:
        with open(output, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "results": [asdict(r) for r in records]}, f,
                      indent=2)
        print(f"bench: wrote {output}")
    return 0
