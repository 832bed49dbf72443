import math

import pytest
import torch

from conftest import native_backends
from numerics import rel_err
from pyvf.ops import grouped_advantages
from pyvf.ops.reference import grouped_advantages_reference

ESTIMATORS = ["rloo", "grpo", "drgrpo"]
BACKENDS = native_backends()


def brute_force(rewards, ids, estimator, eps):
    """The definitions of docs/algorithms.mdsection 2, one reward at a time, in Python floats."""
    r = rewards.double().tolist()
    ids = ids.tolist()
    out = []
    for i, ri in enumerate(r):
        group = [r[j] for j in range(len(r)) if ids[j] == ids[i] and not math.isnan(r[j])]
        if math.isnan(ri) or len(group) < 2 or min(group) == max(group):
            out.append(0.0)
            continue
        mean = sum(group) / len(group)
        if estimator == "rloo":
            out.append(ri - (sum(group) - ri) / (len(group) - 1))
        elif estimator == "grpo":
            std = math.sqrt(sum((x - mean) ** 2 for x in group) / (len(group) - 1))
            out.append((ri - mean) / (std + eps))
        else:
            out.append(ri - mean)
    return torch.tensor(out, dtype=torch.float64)


def ragged_ids(n_groups, max_size, singletons=True):
    sizes = torch.randint(1 if singletons else 2, max_size + 1, (n_groups,))
    # Sparse, signed, shuffled ids: the op must not assume 0..n-1 or sorted order.
    labels = torch.randperm(10 * n_groups)[:n_groups] - 5 * n_groups
    ids = torch.repeat_interleave(labels, sizes)
    return ids[torch.randperm(ids.numel())]


def with_nans(r, frac=0.1):
    r = r.clone()
    r[torch.rand(r.shape) < frac] = float("nan")
    return r


def to(device, *tensors):
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors]


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_reference_matches_definition(estimator):
    ids = ragged_ids(12, 6)
    r = with_nans(torch.randn(ids.numel()))
    r[ids == ids[0]] = 0.25  # one group with equal rewards
    ref = grouped_advantages_reference(r, ids, estimator=estimator, eps=1e-6)
    assert rel_err(ref, brute_force(r, ids, estimator, 1e-6)) < 1e-12


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("group_size", [1, 2, 3, 8, 16, 33, 1000])
def test_contiguous_groups(backend, device, estimator, group_size):
    r = with_nans(torch.rand(group_size * 37))
    (rd,) = to(device, r)
    out = grouped_advantages(rd, group_size, estimator=estimator, backend=backend)
    assert out.dtype == torch.float32 and out.shape == r.shape and out.device == rd.device
    ref = grouped_advantages_reference(r, group_size, estimator=estimator)
    assert rel_err(out, ref) < 1e-5
    if group_size == 1:
        assert torch.all(out == 0)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("n_groups,max_size", [(1, 5), (50, 8), (200, 40), (7, 3000)])
def test_ragged_unsorted_ids(backend, device, estimator, n_groups, max_size):
    ids = ragged_ids(n_groups, max_size)
    r = with_nans(torch.randn(ids.numel()) * 3 + 1)
    rd, idd = to(device, r, ids)
    out = grouped_advantages(rd, idd, estimator=estimator, backend=backend)
    ref = brute_force(r, ids, estimator, 1e-6) if ids.numel() < 2000 else \
        grouped_advantages_reference(r, ids, estimator=estimator)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_degenerate_groups_give_zero(backend, device, estimator):
    # equal rewards, a group of one, a group that is all NaN, a group with one valid reward
    r = torch.tensor([0.7, 0.7, 0.7, 0.3, float("nan"), float("nan"), float("nan"), 2.0, 0.1, 0.9])
    ids = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 4, 4])
    rd, idd = to(device, r, ids)
    out = grouped_advantages(rd, idd, estimator=estimator, backend=backend).cpu()
    assert torch.all(out[:8] == 0)
    assert torch.all(torch.isfinite(out))
    assert out[8] < 0 < out[9]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_known_values(backend, device):
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.0, 1.0])
    rd, = to(device, r)
    rloo = grouped_advantages(rd, 4, estimator="rloo", backend=backend).cpu()
    # 1 - mean(0, 0, 1) = 2/3 ; 0 - mean(1, 0, 1) = -2/3
    assert torch.allclose(rloo[:4], torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    grpo = grouped_advantages(rd, 4, estimator="grpo", eps=0.0, backend=backend).cpu()
    std = math.sqrt(sum((x - 0.5) ** 2 for x in [1, 0, 0, 1]) / 3)
    assert torch.allclose(grpo[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / std)
    dr = grouped_advantages(rd, 4, estimator="drgrpo", backend=backend).cpu()
    assert torch.allclose(dr[4:], torch.tensor([0.0, 0.0, -0.5, 0.5]))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_and_single(backend, device):
    empty = torch.empty(0, device=device)
    assert grouped_advantages(empty, 4, backend=backend).shape == (0,)
    assert grouped_advantages(empty, torch.empty(0, dtype=torch.long, device=device), backend=backend).shape == (0,)
    one = torch.tensor([0.3], device=device)
    assert grouped_advantages(one, 1, backend=backend).tolist() == [0.0]
    assert grouped_advantages(one, torch.tensor([5], device=device), backend=backend).tolist() == [0.0]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_dtypes(backend, device, dtype):
    r = torch.rand(64, dtype=dtype)
    out = grouped_advantages(r.to(device), 8, estimator="grpo", backend=backend)
    assert out.dtype == torch.float32
    assert rel_err(out, grouped_advantages_reference(r, 8, estimator="grpo")) < 1e-5


@pytest.mark.parametrize("backend,device", BACKENDS[:2])
def test_large_batches(backend, device):
    # 10^7 rewards in groups of 8, and one group of 10^6 (one work unit must loop).
    r = torch.rand(10**7, device=device)
    out = grouped_advantages(r, 8, estimator="grpo", backend=backend)
    assert rel_err(out, grouped_advantages_reference(r, 8, estimator="grpo")) < 1e-5
    big = torch.rand(10**6, device=device)
    for estimator in ESTIMATORS:
        out = grouped_advantages(big, torch.zeros(10**6, dtype=torch.int32, device=device),
                                 estimator=estimator, backend=backend)
        assert rel_err(out, grouped_advantages_reference(big, 10**6, estimator=estimator)) < 1e-5
    ids = ragged_ids(20000, 300)
    r = torch.randn(ids.numel())
    out = grouped_advantages(r.to(device), ids.to(device), estimator="rloo", backend=backend)
    assert rel_err(out, grouped_advantages_reference(r, ids, estimator="rloo")) < 1e-5


@pytest.mark.parametrize("kwargs,match", [
    (dict(rewards=torch.zeros(4, 2), groups=2), "rewards must be 1-D"),
    (dict(rewards=torch.zeros(4, dtype=torch.long), groups=2), "rewards must be floating point"),
    (dict(rewards=[0.0, 1.0], groups=2), "rewards must be a torch.Tensor"),
    (dict(rewards=torch.zeros(6), groups=4), "groups=4 does not divide"),
    (dict(rewards=torch.zeros(6), groups=0), "groups must be >= 1"),
    (dict(rewards=torch.zeros(6), groups=-2), "groups must be >= 1"),
    (dict(rewards=torch.zeros(6), groups=True), "groups must be an int"),
    (dict(rewards=torch.zeros(6), groups=2.0), "groups must be an int"),
    (dict(rewards=torch.zeros(6), groups=torch.zeros(5, dtype=torch.long)), "groups must have length 6"),
    (dict(rewards=torch.zeros(6), groups=torch.zeros(6)), "groups must have an integer dtype"),
    (dict(rewards=torch.zeros(6), groups=torch.zeros(6, 1, dtype=torch.long)), "groups must be 1-D"),
    (dict(rewards=torch.zeros(6), groups=2, estimator="ppo"), "estimator must be one of"),
    (dict(rewards=torch.zeros(6), groups=2, eps=-1.0), "eps must be"),
    (dict(rewards=torch.zeros(6), groups=2, eps=float("nan")), "eps must be"),
    (dict(rewards=torch.zeros(6), groups=2, backend="tpu"), "backend must be one of"),
    (dict(rewards=torch.zeros(6), groups=2, backend="cuda"), "backend='cuda' needs CUDA tensors"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        grouped_advantages(kwargs.pop("rewards"), kwargs.pop("groups"), **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to put a tensor on another device")
def test_mixed_devices():
    with pytest.raises(ValueError, match="groups is on"):
        grouped_advantages(torch.zeros(4), torch.zeros(4, dtype=torch.long, device="cuda"))
