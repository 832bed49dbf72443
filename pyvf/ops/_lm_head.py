"""What the two lm_head ops, token_logprobs and policy_loss, share beyond input
validation (pyvf/ops/_checks.py: check_lm_head_inputs): their backends and how one is
picked, the bound on the CPU path's logits buffer, and the selection of the rows that
are not ignored."""

from __future__ import annotations

import os
import sys

import torch

BACKENDS = ("auto", "triton", "cpu", "reference")
# Bound on the CPU path's [chunk, V] logits buffer.
CPU_CHUNK_BYTES = 64 * 2**20


def check_triton_device(device: torch.device) -> None:
    """Triton runs CPU tensors only in its interpreter, which must be switched on
    before triton is first imported. Without CUDA nothing else could use Triton, so
    pyvf switches it on itself; otherwise the user must."""
    if device.type != "cpu":
        return
    if "triton" not in sys.modules and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(
            "backend='triton' on CPU tensors needs the Triton interpreter, which must be enabled before "
            "triton is imported: set TRITON_INTERPRET=1 in the environment")


def resolve_lm_head_backend(backend: str, hidden: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = hidden.device
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "cpu"
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if backend == "triton":
        if hidden.dtype == torch.float64:
            raise ValueError("hidden dtype float64 is not supported by the triton backend; "
                             "use backend='cpu' (CPU tensors) or 'reference'")
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"backend='triton' needs CUDA tensors (or CPU tensors under the interpreter), "
                             f"got {device}")
        check_triton_device(device)
    return backend


def valid_rows(targets: torch.Tensor, ignore_index: int):
    """Indices of the rows that are not ignored, or None when none is (no gather needed)."""
    keep = targets != ignore_index
    rows = keep.nonzero().squeeze(1)
    return None if rows.numel() == targets.numel() else rows
