"""Helpers shared by the tests: the error measure of the project's standards, the list
of backends this machine can run, and the lm_head ops' cases and inputs."""

import os

import pytest
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


# --- the lm_head ops (token_logprobs, policy_loss) --------------------------------------

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}
gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
# conftest.py switches the interpreter on only where there is no GPU; with one, the
# cuda-* cases run the same kernels compiled. Without a GPU these cases never skip: an
# interpreter that is off there is an error worth seeing.
interpreted = pytest.mark.skipif(torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="a GPU is present and TRITON_INTERPRET is not 1, so the cuda-* cases test "
                                        "the kernels compiled (CUDA_VISIBLE_DEVICES= runs these)")
INTERPRETED_TRITON = pytest.param("triton", marks=interpreted, id="triton")

# (backend, device, dtype): the C++ path, the Triton kernels under the interpreter
# (fp32, fp16: the interpreter's bf16 is broken) and, on a GPU, the compiled kernels.
CASES = [
    pytest.param("cpu", "cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cpu", "cpu", torch.float64, id="cpu-fp64"),
    pytest.param("cpu", "cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("triton", "cpu", torch.float32, id="interp-fp32", marks=interpreted),
    pytest.param("triton", "cpu", torch.float16, id="interp-fp16", marks=interpreted),
    pytest.param("triton", "cuda", torch.float32, id="cuda-fp32", marks=gpu),
    pytest.param("triton", "cuda", torch.float16, id="cuda-fp16", marks=gpu),
    pytest.param("triton", "cuda", torch.bfloat16, id="cuda-bf16", marks=gpu),
]


def make_inputs(n, h, v, dtype, device, ignore_frac=0.2, ignore_index=-100):
    hidden = torch.randn(n, h, dtype=torch.float64)
    # Logit scale ~ 3: peaked enough that the target term matters, flat enough to be hard.
    weight = torch.randn(v, h, dtype=torch.float64) * (3.0 / h**0.5)
    targets = torch.randint(0, v, (n,))
    targets[torch.rand(n) < ignore_frac] = ignore_index
    return (hidden.to(dtype).to(device).requires_grad_(), weight.to(dtype).to(device).requires_grad_(),
            targets.to(device))
