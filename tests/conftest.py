import os
import sys

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter, which must be switched on
# before anything imports triton (transformers and torch may, while tests are collected).
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from numerics import CUDA_SKIP_REASON, cuda_ready


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different seed per test (fresh inputs), printed on failure so it can be replayed.
    seed = torch.seed() % (2**31)
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def native_backends():
    """(backend, device) pairs that run here: the CPU always, CUDA when built and present."""
    return [
        pytest.param("cpu", "cpu", id="cpu"),
        pytest.param("cuda", "cuda", id="cuda",
                     marks=[pytest.mark.gpu, pytest.mark.skipif(not cuda_ready(), reason=CUDA_SKIP_REASON)]),
        pytest.param("reference", "cpu", id="reference"),
    ]
