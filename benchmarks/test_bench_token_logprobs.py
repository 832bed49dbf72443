"""token_logprobs against its peers: PyTorch eager (materialized logits, fp32
log-softmax, gather), torch.compile of a chunked version, Liger-Kernel's fused linear
cross entropy and Cut Cross-Entropy (both reduction="none"), all in the same run.

    pytest benchmarks/test_bench_token_logprobs.py --benchmark-group-by=group

On a GPU: bf16, N in {4096, 16384, 65536}, H in {2048, 4096}, V = 151936. First target
(H100, N = 16384, H = 4096): forward+backward >= 400 TFLOP/s counting 6NHV, faster
than every peer, peak memory no higher than Cut Cross-Entropy's. On the CPU: fp32 at
small sizes. A peer that is not installed is skipped with its reason.
"""

import pytest
import torch
from conftest import time_lm_head

from pyvf.bench import LOGPROB_IMPLS

GPU_SHAPES = [(n, h, 151936) for h in (2048, 4096) for n in (4096, 16384, 65536)]
CPU_SHAPES = [(256, 128, 32000), (1024, 128, 32000)]


def shapes(device):
    return GPU_SHAPES if device.type == "cuda" else CPU_SHAPES


@pytest.fixture(params=range(len(GPU_SHAPES)), ids=lambda i: "nhv=%d-%d-%d" % GPU_SHAPES[i])
def shape(request, device):
    options = shapes(device)
    if request.param >= len(options):
        pytest.skip("shape runs on a GPU only")
    return options[request.param]


@pytest.mark.parametrize("pass_", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("impl", list(LOGPROB_IMPLS))
def test_token_logprobs(benchmark, device, sync, shape, impl, pass_):
    n, h, v = shape
    try:
        fn = LOGPROB_IMPLS[impl]()
    except ImportError as e:
        pytest.skip(f"{impl} is not installed ({e.name or e})")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hidden = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, h, device=device) / h**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device)

    if pass_ == "fwd":
        def call():
            with torch.no_grad():
                return fn(hidden, weight, targets)
    else:
        def call():
            hidden.grad = weight.grad = None
            fn(hidden, weight, targets).sum().backward()

    time_lm_head(benchmark, sync, device, call, op="token_logprobs", impl=impl, pass_=pass_, n=n, h=h, v=v,
                 dtype=dtype)
