"""policy_loss (one fused lm_head pass, 6NHV) against token_logprobs + autograd, full
logits, torch.compile chunked, Liger-Kernel's fused linear cross entropy and Cut
Cross-Entropy (default gradient filter and filter_eps=None), forward+backward of
sum_t c_t log p(t), all in the same run.

    pytest benchmarks/test_bench_policy_loss.py --benchmark-group-by=group

On a GPU: bf16, N in {4096, 16384, 65536}, H in {2048, 4096}, V = 151936. Target
(H100/H200, N = 16384, H = 4096): >= 600 TFLOP/s counted 6NHV, faster than every peer,
workspace <= 2 GiB. On the CPU: fp32, H = 128, V = 32000, N from 64 to 4096. A peer that is not installed is
skipped with its reason.
"""

import pytest
import torch
from conftest import time_lm_head

from pyvf.bench.policy_loss import CPU_SHAPES, POLICY_LOSS_IMPLS
from pyvf.bench.token_logprobs import GPU_SHAPES, lm_head_inputs


@pytest.fixture(params=range(len(GPU_SHAPES)), ids=lambda i: "nhv=%d-%d-%d" % GPU_SHAPES[i])
def shape(request, device):
    options = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    if request.param >= len(options):
        pytest.skip("shape runs on a GPU only")
    return options[request.param]


@pytest.mark.parametrize("impl", list(POLICY_LOSS_IMPLS))
def test_policy_loss(benchmark, device, sync, shape, impl):
    n, h, v = shape
    try:
        fn = POLICY_LOSS_IMPLS[impl]()
    except ImportError as e:
        pytest.skip(f"{impl} is not installed ({e.name or e})")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hidden, weight, targets = lm_head_inputs(n, h, v, dtype, device)
    coeffs = torch.randn(n, device=device)

    def call():
        hidden.grad = weight.grad = None
        fn(hidden, weight, targets, coeffs).backward()

    time_lm_head(benchmark, sync, device, call, op="policy_loss", impl=impl, pass_="fwdbwd", n=n, h=h, v=v,
                 dtype=dtype)
