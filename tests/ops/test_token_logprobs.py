import subprocess
import sys
import textwrap

import pytest
import torch

from pyvf.ops import token_logprobs
from pyvf.ops.reference import token_logprobs_reference

from numerics import CASES, INTERPRETED_TRITON, TOL, make_inputs, rel_err


def check_against_reference(backend, hidden, weight, targets, temperature, with_entropy, tol):
    out = token_logprobs(hidden, weight, targets, temperature=temperature, with_entropy=with_entropy,
                         backend=backend)
    logp, entropy = out if with_entropy else (out, None)
    assert logp.dtype == (torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    g = torch.randn_like(logp)
    ge = torch.randn_like(logp)
    loss = (logp * g).sum() + ((entropy * ge).sum() if with_entropy else 0)
    loss.backward()

    h64 = hidden.detach().double().cpu().requires_grad_()
    w64 = weight.detach().double().cpu().requires_grad_()
    ref = token_logprobs_reference(h64, w64, targets.cpu(), temperature=temperature, with_entropy=with_entropy)
    ref_logp, ref_entropy = ref if with_entropy else (ref, None)
    ref_loss = (ref_logp * g.double().cpu()).sum() + ((ref_entropy * ge.double().cpu()).sum() if with_entropy else 0)
    ref_loss.backward()

    assert rel_err(logp, ref_logp) < tol
    if with_entropy:
        assert rel_err(entropy, ref_entropy) < tol
    assert hidden.grad.dtype == hidden.dtype and weight.grad.dtype == weight.dtype
    assert rel_err(hidden.grad, h64.grad) < tol
    assert rel_err(weight.grad, w64.grad) < tol
    ignored = targets.cpu() == -100
    assert torch.all(logp.detach().cpu()[ignored] == 0)
    assert torch.all(hidden.grad.cpu()[ignored] == 0)


@pytest.mark.parametrize("backend,device,dtype", CASES)
@pytest.mark.parametrize("v", [50, 1000, 3001])
@pytest.mark.parametrize("temperature", [0.7, 1.3])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_matches_reference(backend, device, dtype, v, temperature, with_entropy):
    hidden, weight, targets = make_inputs(37, 40, v, dtype, device)
    check_against_reference(backend, hidden, weight, targets, temperature, with_entropy, TOL[dtype])


@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_qwen_vocab_small_n(backend, device, dtype):
    # The real vocabulary size (V = 151936, not a multiple of any tile) with few rows.
    hidden, weight, targets = make_inputs(3, 32, 151936, dtype, device, ignore_frac=0.0)
    check_against_reference(backend, hidden, weight, targets, 1.0, True, TOL[dtype])


@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_single_row(backend, device, dtype):
    hidden, weight, targets = make_inputs(1, 24, 777, dtype, device, ignore_frac=0.0)
    check_against_reference(backend, hidden, weight, targets, 1.0, True, TOL[dtype])


@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_all_rows_ignored(backend, device, dtype):
    hidden, weight, targets = make_inputs(9, 16, 300, dtype, device, ignore_frac=1.1)
    logp, entropy = token_logprobs(hidden, weight, targets, with_entropy=True, backend=backend)
    assert torch.all(logp == 0) and torch.all(entropy == 0)
    (logp.sum() + entropy.sum()).backward()
    assert hidden.grad is None or torch.all(hidden.grad == 0)
    assert weight.grad is None or torch.all(weight.grad == 0)


@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_entropy_gradient_alone(backend, device, dtype):
    # Only the entropy reaches the loss: the log-prob's gradient arrives as None.
    hidden, weight, targets = make_inputs(11, 16, 257, dtype, device)
    _, entropy = token_logprobs(hidden, weight, targets, with_entropy=True, backend=backend)
    entropy.sum().backward()
    h64 = hidden.detach().double().cpu().requires_grad_()
    w64 = weight.detach().double().cpu().requires_grad_()
    token_logprobs_reference(h64, w64, targets.cpu(), with_entropy=True)[1].sum().backward()
    assert rel_err(hidden.grad, h64.grad) < TOL[dtype]
    assert rel_err(weight.grad, w64.grad) < TOL[dtype]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_gradcheck_float64(backend):
    hidden, weight, targets = make_inputs(5, 4, 7, torch.float64, "cpu", ignore_frac=0.3)
    targets[0] = 3

    def fn(h, w):
        logp, entropy = token_logprobs(h, w, targets, temperature=0.8, with_entropy=True, backend=backend)
        return logp, entropy

    assert torch.autograd.gradcheck(fn, (hidden, weight))


@pytest.mark.parametrize("backend,device,dtype", CASES[:5])
def test_no_grad_saves_nothing(backend, device, dtype):
    hidden, weight, targets = make_inputs(6, 8, 100, dtype, device)
    with torch.no_grad():
        logp = token_logprobs(hidden, weight, targets, backend=backend)
    assert logp.grad_fn is None and not logp.requires_grad
    detached = token_logprobs(hidden.detach(), weight.detach(), targets, backend=backend)
    assert detached.grad_fn is None
    assert torch.equal(logp, detached)


@pytest.mark.parametrize("backend", ["cpu", INTERPRETED_TRITON, "reference"])
def test_empty(backend):
    hidden, weight, targets = make_inputs(0, 8, 100, torch.float32, "cpu")
    assert token_logprobs(hidden, weight, targets, backend=backend).shape == (0,)
    logp, entropy = token_logprobs(hidden, weight, targets, with_entropy=True, backend=backend)
    assert logp.shape == entropy.shape == (0,)


def test_non_contiguous_inputs():
    hidden, weight, targets = make_inputs(10, 16, 200, torch.float32, "cpu")
    h_t = hidden.detach().t().contiguous().t()  # same values, column-major
    out = token_logprobs(h_t, weight.detach()[:, :], targets, backend="cpu")
    ref = token_logprobs_reference(hidden.detach(), weight.detach(), targets)
    assert rel_err(out, ref) < 1e-5


H, V = 8, 20


@pytest.mark.parametrize("args,kwargs,match", [
    ((torch.zeros(4), torch.zeros(V, H), torch.zeros(4, dtype=torch.long)), {}, r"hidden must be 2-D"),
    ((torch.zeros(4, H, dtype=torch.long), torch.zeros(V, H), torch.zeros(4, dtype=torch.long)), {},
     "hidden must be floating point"),
    ((torch.zeros(4, H), torch.zeros(V, H + 1), torch.zeros(4, dtype=torch.long)), {}, r"weight must be \[V, H\]"),
    ((torch.zeros(4, H), torch.zeros(V), torch.zeros(4, dtype=torch.long)), {}, r"weight must be \[V, H\]"),
    ((torch.zeros(4, H), torch.zeros(0, H), torch.zeros(4, dtype=torch.long)), {}, "weight must have at least one"),
    ((torch.zeros(4, H), torch.zeros(V, H, dtype=torch.float64), torch.zeros(4, dtype=torch.long)), {},
     "weight dtype torch.float64 must match hidden dtype"),
    ((torch.zeros(4, H), torch.zeros(V, H), torch.zeros(5, dtype=torch.long)), {}, "targets must be 1-D of length"),
    ((torch.zeros(4, H), torch.zeros(V, H), torch.zeros(4)), {}, "targets must have an integer dtype"),
    ((torch.zeros(4, H), torch.zeros(V, H), torch.tensor([0, 1, V, 2])), {}, r"targets\[2\] = 20 is outside"),
    ((torch.zeros(4, H), torch.zeros(V, H), torch.tensor([0, -1, 3, 2])), {}, r"targets\[1\] = -1 is outside"),
    ((torch.zeros(4, H), torch.zeros(V, H), torch.zeros(4, dtype=torch.long)), {"temperature": 0.0},
     "temperature must be a finite number > 0"),
    ((torch.zeros(4, H), torch.zeros(V, H), torch.zeros(4, dtype=torch.long)), {"temperature": float("inf")},
     "temperature must be"),
    ((torch.zeros(4, H), torch.zeros(V, H), torch.zeros(4, dtype=torch.long)), {"backend": "cuda"},
     "backend must be one of"),
    ((torch.zeros(4, H, dtype=torch.float64), torch.zeros(V, H, dtype=torch.float64),
      torch.zeros(4, dtype=torch.long)), {"backend": "triton"}, "float64 is not supported by the triton backend"),
    (([[0.0] * H] * 4, torch.zeros(V, H), torch.zeros(4, dtype=torch.long)), {}, "hidden must be a torch.Tensor"),
])
def test_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        token_logprobs(*args, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mix devices")
def test_mixed_devices():
    with pytest.raises(ValueError, match="weight is on"):
        token_logprobs(torch.zeros(4, H), torch.zeros(V, H, device="cuda"), torch.zeros(4, dtype=torch.long))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak RSS through ru_maxrss (Linux, KiB)")
def test_cpu_memory_stays_far_below_logits():
    # N = 4096, H = 64, V = 151936 in fp32: logits would take 2.4 GB. Forward plus
    # backward must grow peak resident memory by under 10% of that. A fresh process,
    # so the peak is this computation's and not an earlier test's.
    script = textwrap.dedent("""
        import resource, torch
        from pyvf.ops import token_logprobs
        torch.manual_seed(0)
        n, h, v = 4096, 64, 151936
        hidden = torch.randn(n, h, requires_grad=True)
        weight = (torch.randn(v, h) * 0.1).requires_grad_()
        targets = torch.randint(0, v, (n,))
        # Gradients the size of the inputs are part of any backward; allocate them up front.
        hidden.grad = torch.zeros_like(hidden); weight.grad = torch.zeros_like(weight)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        logp, entropy = token_logprobs(hidden, weight, targets, with_entropy=True, backend="cpu")
        (logp.sum() + entropy.sum()).backward()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
        print(after - before)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    grown = int(out.stdout.strip().splitlines()[-1])
    logits_bytes = 4096 * 151936 * 4
    assert grown < 0.1 * logits_bytes, f"peak RSS grew by {grown / 2**20:.0f} MiB"


@pytest.mark.parametrize("backend", [INTERPRETED_TRITON])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_vocabulary_splits_and_grouped_launch_order(backend, monkeypatch, with_entropy):
    """The launch orders a GPU uses, under the interpreter: the forward's 1-D grid with
    the vocabulary split fastest over several splits (the CPU plan is one split), and
    the backward's grouped order over several row blocks, vocabulary blocks and chunks,
    with a ragged last group (5 row blocks in groups of 2)."""
    import pyvf.kernels.triton.token_logprobs as kernels

    n, v = 70, 1000  # 5 row blocks of 16 (the interpreter's tile), V not a multiple of 256
    monkeypatch.setattr(kernels, "_split_vocab", lambda n, v, h, element_size, device: (256, 4))
    monkeypatch.setattr(kernels, "GROUP_N", 2)
    monkeypatch.setattr(kernels, "WORKSPACE_BYTES", n * 4 * 512)  # two backward chunks of 512 columns
    assert kernels.backward_chunk(n, v, 4) == 512
    hidden, weight, targets = make_inputs(n, 24, v, torch.float32, "cpu")
    check_against_reference(backend, hidden, weight, targets, 0.8, with_entropy, TOL[torch.float32])
