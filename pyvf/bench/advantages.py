"""grouped_advantages and segment_sum against their PyTorch composites and a plain copy."""

from __future__ import annotations

import torch

from pyvf.bench import Record, peak_memory_bytes, time_ms
from pyvf.ops import grouped_advantages, segment_sum


def composite_advantages(rewards: torch.Tensor, group_size: int, estimator: str = "grpo",
                         eps: float = 1e-6) -> torch.Tensor:
    """The idiomatic PyTorch composite (view, mean/sum, std) that grouped_advantages is
    measured against, for contiguous groups."""
    x = rewards.view(-1, group_size)
    if estimator == "rloo":
        return (x - (x.sum(1, keepdim=True) - x) / (group_size - 1)).view(-1)
    return ((x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + eps)).view(-1)


def advantage_cases(n: int, device: torch.device, group_size: int = 8) -> list[tuple[str, str, object]]:
    """(op, impl, call) of grouped_advantages and segment_sum against PyTorch composites,
    and a copy, on n fresh rewards (the GPU script times the same calls its own way)."""
    rewards = torch.rand(n, device=device)
    out = torch.empty_like(rewards)
    cu = torch.arange(0, n + 1, 512, device=device)
    if int(cu[-1]) != n:
        cu = torch.cat([cu, torch.tensor([n], device=device)])
    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=device), cu.diff())
    return [
        ("grouped_advantages", "pyvf", lambda: grouped_advantages(rewards, group_size, estimator="grpo")),
        ("grouped_advantages", "torch-composite", lambda: composite_advantages(rewards, group_size)),
        ("grouped_advantages", "copy", lambda: out.copy_(rewards)),
        ("segment_sum", "pyvf", lambda: segment_sum(rewards, cu)),
        ("segment_sum", "torch-index_add",
         lambda: torch.zeros(cu.numel() - 1, device=device).index_add_(0, seg, rewards)),
    ]


def bench_groups(n: int, device: torch.device, group_size: int = 8) -> list[Record]:
    """grouped_advantages and segment_sum against PyTorch composites, and a copy."""
    return [Record(op, impl, "fwd", n, 0, 0, "float32", time_ms(fn, device, repeats=20), None,
                   peak_memory_bytes(fn, device)) for op, impl, fn in advantage_cases(n, device, group_size)]


ABOUT = ("grouped_advantages / segment_sum: B float32 rewards, groups of 8 (segments of 512); B = 1e4, 1e5, "
         "1e6 on the CPU, 1e4, 1e6, 1.6e7 on a GPU. Memory-bound: no FLOP count, compared with a copy of the "
         "same bytes. peak MiB on CUDA only")


def default_sizes(device: torch.device) -> list[int]:
    return [10**4, 10**6, 16 * 10**6] if device.type == "cuda" else [10**4, 10**5, 10**6]


def run(device: torch.device, sizes: list[int] | None, impls: list[str] | None) -> list[Record]:
    records = []
    for n in sizes or default_sizes(device):
        print(f"bench: grouped_advantages / segment_sum, n={n}", flush=True)
        records += bench_groups(n, device)
    return records
