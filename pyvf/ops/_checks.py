"""Input validation shared by the public ops: every failure is a ValueError that
names the argument and the problem."""

from __future__ import annotations

import math

import torch

BACKENDS = ("auto", "cpu", "cuda", "reference")


def check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_1d_floating(name: str, t) -> None:
    check_tensor(name, t)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {t.dtype}")


def check_1d_integer(name: str, t, length: int | None = None) -> None:
    check_tensor(name, t)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {t.dtype}")
    if length is not None and t.numel() != length:
        raise ValueError(f"{name} must have length {length}, got {t.numel()}")


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first:
            raise ValueError(f"{name} is on {device} but {first_name} is on {first}; move them to one device")
    return first


def check_lm_head_inputs(hidden, weight, targets, temperature, ignore_index) -> None:
    """The inputs common to the lm_head ops (token_logprobs, policy_loss): hidden [N, H]
    floating, weight [V, H] of its dtype, integer targets [N] in [0, V) or ignore_index,
    all on one device, and a finite temperature > 0."""
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        check_tensor(name, t)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, H], got shape {tuple(hidden.shape)}")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be floating point, got {hidden.dtype}")
    n, h = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != h:
        raise ValueError(f"weight must be [V, H] with H = {h} (hidden's last dim), got shape {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one row (V >= 1)")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(f"targets must be 1-D of length N = {n}, got shape {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must have an integer dtype, got {targets.dtype}")
    check_same_device(hidden=hidden, weight=weight, targets=targets)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    v = weight.shape[0]
    bad = ((targets < 0) | (targets >= v)) & (targets != ignore_index)
    if n and bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets[{i}] = {int(targets[i])} is outside [0, {v}) and is not "
                         f"ignore_index ({ignore_index})")


def check_nonnegative_finite(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {x!r}")
    return float(x)


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' follows the device; an explicit native backend must match it."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "cuda" if device.type == "cuda" else "cpu"
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
    return backend


def native_dtype(t: torch.Tensor) -> torch.Tensor:
    """The native kernels take float32 and float64; half precision is widened."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()
