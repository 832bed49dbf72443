import pytest
import torch

from conftest import native_backends
from numerics import rel_err
from pyvf.ops import segment_sum
from pyvf.ops.reference import segment_sum_reference

BACKENDS = native_backends()


def random_cu(n_segments, max_len, empty_frac=0.2):
    lengths = torch.randint(0, max_len + 1, (n_segments,))
    lengths[torch.rand(n_segments) < empty_frac] = 0
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("n_segments,max_len", [(1, 1), (1, 5000), (37, 12), (300, 700), (5, 100000)])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_reference(backend, device, dtype, n_segments, max_len, masked):
    cu = random_cu(n_segments, max_len)
    values = torch.randn(int(cu[-1]), dtype=dtype)
    mask = torch.rand(values.shape) < 0.6 if masked else None
    out = segment_sum(values.to(device), cu.to(device), mask=None if mask is None else mask.to(device),
                      backend=backend)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == (n_segments,)
    ref = segment_sum_reference(values, cu, mask)
    # A brute-force check of the reference itself.
    brute = [values[a:b][mask[a:b]].double().sum() if masked else values[a:b].double().sum()
             for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    assert rel_err(ref, torch.stack(brute)) < 1e-12
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradient(backend, device):
    cu = random_cu(20, 30)
    values = torch.randn(int(cu[-1]), dtype=torch.float64, device=device, requires_grad=True)
    mask = (torch.rand(values.shape) < 0.5).to(device)
    upstream = torch.randn(20, dtype=torch.float64, device=device)
    (segment_sum(values, cu.to(device), mask=mask, backend=backend) * upstream).sum().backward()
    seg = torch.repeat_interleave(torch.arange(20), cu.diff()).to(device)
    assert torch.equal(values.grad, upstream[seg] * mask)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty(backend, device):
    out = segment_sum(torch.empty(0, device=device), torch.zeros(1, dtype=torch.long, device=device), backend=backend)
    assert out.shape == (0,)
    out = segment_sum(torch.empty(0, device=device), torch.zeros(4, dtype=torch.int32, device=device), backend=backend)
    assert out.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("args,kwargs,match", [
    ((torch.zeros(4), torch.tensor([1, 4])), {}, "cu_seqlens must start at 0"),
    ((torch.zeros(4), torch.tensor([0, 3, 2, 4])), {}, "cu_seqlens must be non-decreasing"),
    ((torch.zeros(4), torch.tensor([0, 3])), {}, r"cu_seqlens must end at len\(values\) = 4"),
    ((torch.zeros(4), torch.tensor([], dtype=torch.long)), {}, "cu_seqlens must have at least one entry"),
    ((torch.zeros(4), torch.tensor([0.0, 4.0])), {}, "cu_seqlens must have an integer dtype"),
    ((torch.zeros(4, 1), torch.tensor([0, 4])), {}, "values must be 1-D"),
    ((torch.zeros(4, dtype=torch.long), torch.tensor([0, 4])), {}, "values must be floating point"),
    ((torch.zeros(4), torch.tensor([0, 4])), {"mask": torch.ones(4)}, "mask must be a bool tensor"),
    ((torch.zeros(4), torch.tensor([0, 4])), {"mask": torch.ones(3, dtype=torch.bool)}, "mask must have the shape"),
    ((torch.zeros(4), torch.tensor([0, 4])), {"backend": "gpu"}, "backend must be one of"),
])
def test_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        segment_sum(*args, **kwargs)
