"""policy_loss's Triton path in bf16, emulated on the CPU: the chunk loop of
pyvf/kernels/triton/policy_loss.py runs on bf16 CPU tensors with its GEMMs as the GPU
runs them (fp32 accumulation, the output stored in the output's dtype) and its row
kernel replaced by `policy_rows_reference`, the kernel's arithmetic in PyTorch (checked
against the kernel here, fp32 and fp16 under the interpreter, whose bf16 stores
truncate instead of rounding to nearest as the GPU does).

With bf16 logits in the workspace (the kernel before it kept them in fp32), the
gradients missed the 1e-2 bound: 17 of 20 seeds at V = 3001, T = 0.7 with the entropy
term (up to 0.019)."""

import pytest
import torch

from pyvf.kernels.triton import policy_loss as kernels
from pyvf.ops.reference import policy_loss_reference

from numerics import INTERPRETED_TRITON, TOL, make_inputs, rel_err


def _emulated_rows(z, dz, targets, coeffs, ecoeffs, logp, entropy, inv_temp, need_grad, with_entropy_grad):
    lp, ent = kernels.policy_rows_reference(z, dz if need_grad else None, targets, coeffs,
                                            ecoeffs if with_entropy_grad else None, inv_temp)
    logp.copy_(lp)
    entropy.copy_(ent)


def _check_bf16(monkeypatch, n, h, v, temperature, with_entropy, workspace_bytes=1 << 30):
    monkeypatch.setattr(kernels, "_launch_rows", _emulated_rows)
    hidden, weight, targets = make_inputs(n, h, v, torch.bfloat16, "cpu", ignore_frac=0.0)
    hidden, weight = hidden.detach(), weight.detach()
    coeffs = torch.randn(n)
    ecoeffs = torch.randn(n) if with_entropy else None
    logp, entropy, d_hidden, d_weight = kernels.fused(hidden, weight, targets, coeffs, ecoeffs, 1.0 / temperature,
                                                      True, True, workspace_bytes)
    assert d_hidden.dtype == d_weight.dtype == torch.bfloat16
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    loss, ref_logp, ref_entropy = policy_loss_reference(h64, w64, targets, coeffs, temperature=temperature,
                                                        entropy_coeffs=ecoeffs)
    loss.backward()
    tol = TOL[torch.bfloat16]
    assert rel_err(logp, ref_logp) < tol and rel_err(entropy, ref_entropy) < tol
    assert rel_err(d_hidden, h64.grad) < tol, rel_err(d_hidden, h64.grad)
    assert rel_err(d_weight, w64.grad) < tol, rel_err(d_weight, w64.grad)


@pytest.mark.parametrize("v,temperature", [(50, 1.0), (1000, 1.3), (3001, 0.7)])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_bf16_gradients_match_the_reference(monkeypatch, v, temperature, with_entropy):
    _check_bf16(monkeypatch, 37, 40, v, temperature, with_entropy)


def test_bf16_qwen_vocabulary(monkeypatch):
    _check_bf16(monkeypatch, 3, 32, 151936, 1.0, True)


def test_bf16_balanced_chunks(monkeypatch):
    """Several chunks (the workspace holds 150 rows of 3001 logits: chunks of 129 and
    129 rows for 258 rows, not 150 and 108): the d_weight accumulation in fp32."""
    assert kernels.chunk_rows(258, 3001, torch.bfloat16, 150 * 3001 * 6) == 129
    _check_bf16(monkeypatch, 258, 24, 3001, 0.7, True, workspace_bytes=150 * 3001 * 6)


def test_chunk_rows():
    per_row = kernels.workspace_bytes_per_row(1000, torch.bfloat16)
    assert per_row == 6000 and kernels.workspace_bytes_per_row(1000, torch.float32) == 4000
    assert kernels.chunk_rows(100, 1000, torch.bfloat16, 10**9) == 100          # one chunk
    # 4 chunks of 250 rows, aligned: 256 (the last 232), never 3 x 300 + 100.
    assert kernels.chunk_rows(1000, 1000, torch.bfloat16, 300 * per_row) == 256
    assert kernels.chunk_rows(1000, 1000, torch.bfloat16, 600 * per_row) == 512
    assert kernels.chunk_rows(1000, 1000, torch.bfloat16, 501 * per_row) == 500  # 512 would not fit
    assert kernels.chunk_rows(4000, 1000, torch.bfloat16, 1100 * per_row) == 1024  # aligned to 128, within
    assert kernels.chunk_rows(5, 1000, torch.bfloat16, 1) == 1


@pytest.mark.parametrize("backend", [INTERPRETED_TRITON])
@pytest.mark.parametrize("dz_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_row_reference_is_the_kernel(backend, dz_dtype, with_entropy):
    """policy_rows_reference computes what _policy_rows_kernel computes, from the same
    fp32 logits (V not a multiple of the kernel's tile)."""
    rows, v = 5, 3001
    z = torch.randn(rows, v) * 3
    targets = torch.randint(0, v, (rows,))
    coeffs = torch.randn(rows)
    ecoeffs = torch.randn(rows) if with_entropy else None
    out = {}
    for name, launch in (("kernel", kernels._launch_rows), ("reference", _emulated_rows)):
        dz = torch.empty(rows, v, dtype=dz_dtype) if dz_dtype != torch.float32 else z.clone()
        logp, entropy = torch.empty(rows), torch.empty(rows)
        launch(z.clone() if dz_dtype != torch.float32 else dz, dz, targets, coeffs, ecoeffs, logp, entropy, 1 / 0.7,
               True, with_entropy)
        out[name] = (logp, entropy, dz)
    (lk, ek, dk), (lr, er, dr) = out["kernel"], out["reference"]
    assert rel_err(lk, lr) < 1e-6 and rel_err(ek, er) < 1e-5
    # fp16 stores: the interpreter truncates, the reference rounds to nearest.
    assert rel_err(dk, dr) < (1e-5 if dz_dtype == torch.float32 else 2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the two-stream chunk loop)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_chunks_on_two_streams_cuda(dtype):
    """On CUDA with several chunks the d_weight GEMMs run on a side stream, overlapped
    with the next chunk: 1000 rows in chunks of 64 give the one-chunk gradients."""
    from pyvf.ops import policy_loss

    hidden, weight, targets = make_inputs(1000, 64, 3001, dtype, "cuda")
    coeffs, ecoeffs = torch.randn(1000, device="cuda"), torch.randn(1000, device="cuda")
    workspace_mb = 64 * kernels.workspace_bytes_per_row(3001, dtype, overlap=True) / 2**20  # chunks of 64 rows
    loss, logp, entropy = policy_loss(hidden, weight, targets, coeffs, entropy_coeffs=ecoeffs,
                                      workspace_mb=workspace_mb)
    loss.backward()
    h64, w64 = hidden.detach().double().cpu().requires_grad_(), weight.detach().double().cpu().requires_grad_()
    ref_loss, ref_logp, _ = policy_loss_reference(h64, w64, targets.cpu(), coeffs.cpu(), entropy_coeffs=ecoeffs.cpu())
    ref_loss.backward()
    tol = TOL[dtype]
    assert rel_err(logp, ref_logp) < tol
    assert rel_err(hidden.grad, h64.grad) < tol and rel_err(weight.grad, w64.grad) < tol
