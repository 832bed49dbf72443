"""Per-group advantages: rewards of the G samples of one prompt, normalized within
their group. Kernels: csrc/group_ops_cpu.cpp and kernels/cuda/group_ops.cu, with the
arithmetic in csrc/include/pyvf/group_math.h."""

from __future__ import annotations

import torch

from pyvf._native import native
from pyvf.ops._checks import (
    check_1d_floating, check_1d_integer, check_nonnegative_finite, check_same_device, native_dtype, resolve_backend,
)
from pyvf.ops.reference import grouped_advantages_reference

# Must match pyvf::Estimator in csrc/include/pyvf/group_math.h.
_ESTIMATORS = {"rloo": 0, "grpo": 1, "drgrpo": 2}


def _check_groups(groups, n: int, rewards: torch.Tensor):
    if isinstance(groups, bool) or not isinstance(groups, (int, torch.Tensor)):
        raise ValueError(f"groups must be an int group size or an integer tensor of group ids, "
                         f"got {type(groups).__name__}")
    if isinstance(groups, int):
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        if n % groups:
            raise ValueError(f"groups={groups} does not divide the number of rewards {n}")
        return
    check_1d_integer("groups", groups, length=n)
    check_same_device(rewards=rewards, groups=groups)


@torch.no_grad()
def grouped_advantages(rewards: torch.Tensor, groups: int | torch.Tensor, *, estimator: str = "rloo",
                       eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """Advantages of `rewards` [B] within their groups, float32 [B].

    groups: an int G (contiguous groups of G) or an integer tensor [B] of group ids
    in any order. estimator: "rloo" (r - mean of the others), "grpo"
    ((r - mean) / (std + eps), unbiased std) or "drgrpo" (r - mean). NaN rewards are
    left out of their group's statistics and get 0, as do groups of one and groups
    whose rewards are all equal. backend: "auto" (follows the device), "cpu",
    "cuda" or "reference". Not differentiable: rewards are treated as constants.
    """
    check_1d_floating("rewards", rewards)
    if estimator not in _ESTIMATORS:
        raise ValueError(f"estimator must be one of {tuple(_ESTIMATORS)}, got {estimator!r}")
    eps = check_nonnegative_finite("eps", eps)
    n = rewards.numel()
    _check_groups(groups, n, rewards)
    backend = resolve_backend(backend, rewards.device)
    if n == 0:
        return torch.empty(0, dtype=torch.float32, device=rewards.device)
    if backend == "reference":
        return grouped_advantages_reference(rewards, groups, estimator=estimator, eps=eps).float()

    rewards = native_dtype(rewards.detach()).contiguous()
    if isinstance(groups, int):
        return native().grouped_advantages(rewards, groups, None, None, _ESTIMATORS[estimator], eps)
    # Arbitrary ids become segments of a stable sort: the kernel then reduces
    # contiguous runs, one work unit per group, in a single launch.
    sorted_ids, order = torch.sort(groups, stable=True)
    counts = torch.unique_consecutive(sorted_ids, return_counts=True)[1]
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=rewards.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return native().grouped_advantages(rewards, 0, offsets, order.contiguous(), _ESTIMATORS[estimator], eps)
