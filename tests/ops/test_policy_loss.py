"""policy_loss: values and gradients of sum_t c_t log p(t) (+ sum_t e_t H_t) against the
float64 reference and against autograd through token_logprobs, for every backend."""

import pytest
import torch

from pyvf.ops import policy_loss, token_logprobs
from pyvf.ops.reference import policy_loss_reference

from numerics import CASES, INTERPRETED_TRITON, TOL, make_inputs, rel_err


def reference(hidden, weight, targets, coeffs, entropy_coeffs, temperature):
    h64 = hidden.detach().double().cpu().requires_grad_()
    w64 = weight.detach().double().cpu().requires_grad_()
    loss, logp, entropy = policy_loss_reference(
        h64, w64, targets.cpu(), coeffs.cpu(), temperature=temperature,
        entropy_coeffs=None if entropy_coeffs is None else entropy_coeffs.cpu())
    loss.backward()
    return loss.detach(), logp, entropy, h64.grad, w64.grad


def loss_scale(coeffs, logp, entropy_coeffs, entropy):
    """sum |c logp| (+ sum |e H|): the size of the terms the loss adds up, the yardstick
    for its error (the loss itself may cancel to ~0 with mixed-sign coefficients)."""
    scale = (coeffs.double().cpu() * logp).abs().sum()
    if entropy_coeffs is not None:
        scale = scale + (entropy_coeffs.double().cpu() * entropy).abs().sum()
    return float(scale)


def check_against_reference(backend, hidden, weight, targets, coeffs, entropy_coeffs, temperature, tol):
    loss, logp, entropy = policy_loss(hidden, weight, targets, coeffs, temperature=temperature,
                                      entropy_coeffs=entropy_coeffs, backend=backend)
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    assert loss.dim() == 0 and loss.dtype == logp.dtype == entropy.dtype == out_dtype
    assert not logp.requires_grad and not entropy.requires_grad
    loss.backward()
    ref_loss, ref_logp, ref_entropy, ref_dh, ref_dw = reference(hidden, weight, targets, coeffs, entropy_coeffs,
                                                                temperature)
    scale = loss_scale(coeffs, ref_logp, entropy_coeffs, ref_entropy)
    assert abs(float(loss.detach()) - float(ref_loss)) <= tol * max(scale, 1e-30)
    assert rel_err(logp, ref_logp) < tol
    assert rel_err(entropy, ref_entropy) < tol
    assert hidden.grad.dtype == hidden.dtype and weight.grad.dtype == weight.dtype
    assert rel_err(hidden.grad, ref_dh) < tol
    assert rel_err(weight.grad, ref_dw) < tol
    ignored = targets.cpu() == -100
    assert torch.all(logp.cpu()[ignored] == 0) and torch.all(entropy.cpu()[ignored] == 0)
    assert torch.all(hidden.grad.cpu()[ignored] == 0)


@pytest.mark.parametrize("backend,device,dtype", CASES)
@pytest.mark.parametrize("v,temperature", [(50, 1.0), (1000, 1.3), (3001, 0.7)])  # 3001: no tile divides it
@pytest.mark.parametrize("with_entropy", [False, True])
def test_matches_reference(backend, device, dtype, v, temperature, with_entropy):
    hidden, weight, targets = make_inputs(37, 40, v, dtype, device)
    coeffs = torch.randn(37, device=device)
    ecoeffs = torch.randn(37, device=device) if with_entropy else None
    check_against_reference(backend, hidden, weight, targets, coeffs, ecoeffs, temperature, TOL[dtype])


@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_qwen_vocab_small_n(backend, device, dtype):
    # The real vocabulary size (V = 151936, not a multiple of any tile) with few rows.
    hidden, weight, targets = make_inputs(3, 32, 151936, dtype, device, ignore_frac=0.0)
    coeffs, ecoeffs = torch.randn(3, device=device), torch.randn(3, device=device)
    check_against_reference(backend, hidden, weight, targets, coeffs, ecoeffs, 1.0, TOL[dtype])


@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_single_row(backend, device, dtype):
    hidden, weight, targets = make_inputs(1, 24, 777, dtype, device, ignore_frac=0.0)
    coeffs, ecoeffs = torch.tensor([-0.37], device=device), torch.tensor([0.01], device=device)
    check_against_reference(backend, hidden, weight, targets, coeffs, ecoeffs, 1.0, TOL[dtype])


@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_all_rows_ignored(backend, device, dtype):
    # Huge coefficients on ignored rows must not leak into anything.
    hidden, weight, targets = make_inputs(9, 16, 300, dtype, device, ignore_frac=1.1)
    coeffs = torch.full((9,), 1e30, device=device)
    loss, logp, entropy = policy_loss(hidden, weight, targets, coeffs, entropy_coeffs=-coeffs, backend=backend)
    assert float(loss.detach()) == 0 and torch.all(logp == 0) and torch.all(entropy == 0)
    loss.backward()
    assert hidden.grad is None or torch.all(hidden.grad == 0)
    assert weight.grad is None or torch.all(weight.grad == 0)


@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_coefficient_extremes(backend, device, dtype):
    # Negative, zero and huge coefficients side by side, and ignored rows whose
    # coefficients are huge (they must still give nothing).
    n = 12
    hidden, weight, targets = make_inputs(n, 16, 513, dtype, device, ignore_frac=0.0)
    targets[[2, 7]] = -100
    # fp16 tops out at 65504: its "huge" is smaller, so that the gradients themselves fit.
    big = 1e2 if dtype == torch.float16 else 1e6
    coeffs = torch.tensor([1, -1, 30, 0.0, -0.0, 1e-14, -2.5e-6, 0.0, 1e-2, -1e-9, 7e-6, 1e-6], device=device) * big
    ecoeffs = torch.tensor([0.0, 0.1, -4, 2e-6, 0.0, -1e-12, 0.0, 9e3, -3e-6, 0.0, 1e-3, 5e-7], device=device) * big
    check_against_reference(backend, hidden, weight, targets, coeffs, ecoeffs, 0.9, TOL[dtype])


@pytest.mark.parametrize("backend,device,dtype", CASES[:5])
def test_gradient_equals_autograd_through_token_logprobs(backend, device, dtype):
    # The fused pass is the same loss as (c * logp).sum() + (e * H).sum() built from
    # token_logprobs, whose gradient autograd derives by recomputing the logits.
    hidden, weight, targets = make_inputs(23, 24, 1500, dtype, device)
    coeffs, ecoeffs = torch.randn(23, device=device), 0.1 * torch.randn(23, device=device)
    loss, logp, entropy = policy_loss(hidden, weight, targets, coeffs, entropy_coeffs=ecoeffs, temperature=1.2,
                                      backend=backend)
    loss.backward()
    d_hidden, d_weight = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    t_logp, t_entropy = token_logprobs(hidden, weight, targets, temperature=1.2, with_entropy=True, backend=backend)
    t_loss = (coeffs * t_logp).sum() + (ecoeffs * t_entropy).sum()
    t_loss.backward()
    tol = TOL[dtype]
    assert abs(float(loss.detach()) - float(t_loss.detach())) <= tol * loss_scale(coeffs, t_logp.detach(), ecoeffs, t_entropy.detach())
    assert rel_err(logp, t_logp) < tol and rel_err(entropy, t_entropy) < tol
    assert rel_err(d_hidden, hidden.grad) < tol
    assert rel_err(d_weight, weight.grad) < tol


def test_entropy_gradient_formula():
    # d H / d z_j = -p_j (log p_j + H): only the entropy term reaches the loss, compared
    # with autograd through the float64 reference (dtype float64, C++ path).
    hidden, weight, targets = make_inputs(7, 8, 97, torch.float64, "cpu", ignore_frac=0.0)
    zeros, ecoeffs = torch.zeros(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    loss, _, _ = policy_loss(hidden, weight, targets, zeros, entropy_coeffs=ecoeffs, temperature=0.8, backend="cpu")
    loss.backward()
    _, _, _, ref_dh, ref_dw = reference(hidden, weight, targets, zeros, ecoeffs, 0.8)
    assert rel_err(hidden.grad, ref_dh) < 1e-10 and rel_err(weight.grad, ref_dw) < 1e-10


def numerical_gradient(f, x, eps=1e-6):
    """Central differences of the scalar f() w.r.t. every element of x (float64)."""
    grad = torch.zeros_like(x)
    flat, g = x.detach().view(-1), grad.view(-1)
    for i in range(flat.numel()):
        old = float(flat[i])
        flat[i] = old + eps
        hi = float(f())
        flat[i] = old - eps
        lo = float(f())
        flat[i] = old
        g[i] = (hi - lo) / (2 * eps)
    return grad


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_gradcheck_float64(backend, with_entropy):
    # torch.autograd.gradcheck runs backward twice through one graph, which policy_loss
    # does not allow (the gradients are handed out once), so the same check by hand:
    # analytic gradients against central differences in float64.
    hidden, weight, targets = make_inputs(5, 4, 7, torch.float64, "cpu", ignore_frac=0.3)
    targets[0] = 3
    coeffs = torch.randn(5, dtype=torch.float64)
    ecoeffs = torch.randn(5, dtype=torch.float64) if with_entropy else None

    def f():
        with torch.no_grad():
            return policy_loss(hidden, weight, targets, coeffs, entropy_coeffs=ecoeffs, temperature=0.8,
                               backend=backend)[0]

    loss = policy_loss(hidden, weight, targets, coeffs, entropy_coeffs=ecoeffs, temperature=0.8, backend=backend)[0]
    loss.backward()
    torch.testing.assert_close(hidden.grad, numerical_gradient(f, hidden), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(weight.grad, numerical_gradient(f, weight), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend,device,dtype", CASES[:5])
def test_no_grad_computes_values_only(backend, device, dtype):
    hidden, weight, targets = make_inputs(6, 8, 100, dtype, device)
    coeffs = torch.randn(6, device=device)
    with torch.no_grad():
        loss, logp, entropy = policy_loss(hidden, weight, targets, coeffs, backend=backend)
    assert loss.grad_fn is None and not loss.requires_grad
    d_loss, d_logp, d_entropy = policy_loss(hidden.detach(), weight.detach(), targets, coeffs, backend=backend)
    assert d_loss.grad_fn is None
    g_loss, g_logp, g_entropy = policy_loss(hidden, weight, targets, coeffs, backend=backend)
    for a, b, c in ((loss, d_loss, g_loss), (logp, d_logp, g_logp), (entropy, d_entropy, g_entropy)):
        assert torch.equal(a, b)
        assert rel_err(a, c.detach()) < TOL[dtype]


@pytest.mark.parametrize("backend", ["cpu", INTERPRETED_TRITON])
def test_only_the_inputs_that_need_a_gradient_get_one(backend):
    hidden, weight, targets = make_inputs(10, 16, 300, torch.float32, "cpu")
    coeffs = torch.randn(10)
    hidden.requires_grad_(False)
    policy_loss(hidden, weight, targets, coeffs, backend=backend)[0].backward()
    assert hidden.grad is None
    ref_dw = reference(hidden, weight, targets, coeffs, None, 1.0)[4]
    assert rel_err(weight.grad, ref_dw) < 1e-5


@pytest.mark.parametrize("backend", ["cpu", INTERPRETED_TRITON, "reference"])
def test_upstream_gradient_scales_and_accumulates(backend):
    hidden, weight, targets = make_inputs(8, 16, 200, torch.float32, "cpu")
    coeffs = torch.randn(8)
    (2.5 * policy_loss(hidden, weight, targets, coeffs, backend=backend)[0]).backward()
    once = hidden.grad.clone()
    (-1.5 * policy_loss(hidden, weight, targets, coeffs, backend=backend)[0]).backward()  # accumulates
    ref_dh = reference(hidden, weight, targets, coeffs, None, 1.0)[3]
    assert rel_err(once, 2.5 * ref_dh) < 1e-5
    assert rel_err(hidden.grad, 1.0 * ref_dh) < 1e-5


def test_second_backward_through_one_graph_is_an_error():
    hidden, weight, targets = make_inputs(4, 8, 50, torch.float32, "cpu")
    loss = policy_loss(hidden, weight, targets, torch.randn(4))[0]
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("backend", ["cpu", INTERPRETED_TRITON])
def test_small_workspace_many_chunks(backend):
    # A workspace of a few rows forces many chunks: the d_weight accumulation across
    # chunks must give the same gradient as one chunk.
    hidden, weight, targets = make_inputs(19, 16, 700, torch.float32, "cpu")
    coeffs, ecoeffs = torch.randn(19), torch.randn(19)
    workspace_mb = 3 * 700 * 4 / 2**20  # three rows of fp32 logits
    loss, logp, entropy = policy_loss(hidden, weight, targets, coeffs, entropy_coeffs=ecoeffs,
                                      workspace_mb=workspace_mb, backend=backend)
    loss.backward()
    _, ref_logp, ref_entropy, ref_dh, ref_dw = reference(hidden, weight, targets, coeffs, ecoeffs, 1.0)
    assert rel_err(logp, ref_logp) < 1e-5 and rel_err(entropy, ref_entropy) < 1e-5
    assert rel_err(hidden.grad, ref_dh) < 1e-5 and rel_err(weight.grad, ref_dw) < 1e-5


@pytest.mark.parametrize("backend", ["cpu", INTERPRETED_TRITON, "reference"])
def test_empty(backend):
    hidden, weight, targets = make_inputs(0, 8, 100, torch.float32, "cpu")
    loss, logp, entropy = policy_loss(hidden, weight, targets, torch.zeros(0), backend=backend)
    assert loss.shape == () and float(loss) == 0 and logp.shape == entropy.shape == (0,)


H, V = 8, 20


def _ok():
    return torch.zeros(4, H), torch.zeros(V, H), torch.zeros(4, dtype=torch.long), torch.zeros(4)


@pytest.mark.parametrize("change,match", [
    (dict(coeffs=torch.zeros(5)), "coeffs must have length N = 4"),
    (dict(coeffs=torch.zeros(4, 1)), "coeffs must be 1-D"),
    (dict(coeffs=torch.zeros(4, dtype=torch.long)), "coeffs must be floating point"),
    (dict(coeffs=torch.tensor([0.0, float("nan"), 0.0, 0.0])), r"coeffs must be finite, got coeffs\[1\] = nan"),
    (dict(coeffs=torch.tensor([0.0, 0.0, float("inf"), 0.0])), r"coeffs must be finite, got coeffs\[2\]"),
    (dict(coeffs=[0.0] * 4), "coeffs must be a torch.Tensor"),
    (dict(entropy_coeffs=torch.zeros(3)), "entropy_coeffs must have length N = 4"),
    (dict(entropy_coeffs=torch.tensor([0.0, 0.0, 0.0, float("-inf")])), "entropy_coeffs must be finite"),
    (dict(entropy_coeffs=torch.zeros(4, dtype=torch.int32)), "entropy_coeffs must be floating point"),
    (dict(workspace_mb=0), "workspace_mb must be a finite number > 0"),
    (dict(workspace_mb=-1.0), "workspace_mb must be"),
    (dict(workspace_mb=True), "workspace_mb must be"),
    (dict(temperature=0.0), "temperature must be a finite number > 0"),
    (dict(hidden=torch.zeros(4)), r"hidden must be 2-D"),
    (dict(weight=torch.zeros(V, H + 1)), r"weight must be \[V, H\]"),
    (dict(targets=torch.tensor([0, 1, V, 2])), r"targets\[2\] = 20 is outside"),
    (dict(backend="cuda"), "backend must be one of"),
])
def test_bad_input(change, match):
    hidden, weight, targets, coeffs = _ok()
    args = dict(hidden=hidden, weight=weight, targets=targets, coeffs=coeffs)
    kwargs = {}
    for k, v in change.items():
        (args if k in args else kwargs)[k] = v
    with pytest.raises(ValueError, match=match):
        policy_loss(args["hidden"], args["weight"], args["targets"], args["coeffs"], **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mix devices")
@pytest.mark.gpu
def test_mixed_devices():
    hidden, weight, targets, coeffs = (t.cuda() for t in _ok())
    with pytest.raises(ValueError, match="coeffs is on"):
        policy_loss(hidden, weight, targets, coeffs.cpu())


@pytest.mark.parametrize("backend", ["cpu", INTERPRETED_TRITON])
def test_tiny_coefficients_beside_normal_ones(backend):
    """Rows whose coefficient is ~1e-35 (VeriFree's reward of a long reference): their
    dL/dz is subnormal, which the CPU path flushes to zero for speed; beside rows with
    normal coefficients the gradient still matches the reference."""
    hidden, weight, targets = make_inputs(64, 32, 1000, torch.float32, "cpu", ignore_frac=0.0)
    coeffs = torch.randn(64)
    coeffs[::2] *= 1e-35
    check_against_reference(backend, hidden, weight, targets, coeffs, None, 1.0, 1e-5)


def test_flush_subnormals_sets_every_cpu_thread():
    """pyvf._native.flush_subnormals (on in CPU training): a product below 1.2e-38 is 0,
    in the calling thread and in the threads of a multi-threaded GEMM; off again, it is
    kept."""
    from pyvf._native import flush_subnormals

    a = torch.full((256, 256), 1e-30)
    b = torch.full((256, 256), 1e-10)
    try:
        if flush_subnormals(True) == 0:
            pytest.skip("this CPU has no flush-to-zero mode (not x86-64)")
        assert float((a[0, 0] * b[0, 0])) == 0.0 and float((a @ b).abs().max()) == 0.0
        flush_subnormals(False)
        assert float(a[0, 0] * b[0, 0]) > 0 and float((a @ b).min()) > 0
    finally:
        flush_subnormals(True)  # as a training run in this process leaves it
