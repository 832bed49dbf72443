"""Helpers shared by the tests: the error measure of the project's standards and the
list of backends this machine can run."""

import torch

import pyvf


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (the absolute norm when ref is all zero)."""
    out, ref = out.double().cpu(), ref.double().cpu()
    diff = torch.linalg.vector_norm(out - ref).item()
    scale = torch.linalg.vector_norm(ref).item()
    return diff / scale if scale > 0 else diff


def cuda_ready() -> bool:
    return torch.cuda.is_available() and pyvf.build_info()["cuda"]


CUDA_SKIP_REASON = "needs a CUDA device and pyvf._C built with CUDA"
