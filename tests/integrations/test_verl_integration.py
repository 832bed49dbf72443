"""pyvf.integrations.verl: verl's fused log-prob/entropy contract backed by token_logprobs.

The float64-reference tests run everywhere. The tests against verl itself (its
`FusedLinearForPPO`, verl/utils/experimental/torch_functional.py, and its fused model
forward, verl/models/transformers/dense_common.py, both verl 0.9.1) run where verl
imports: the virtual environment `bash .ci/trl.sh` builds.
"""

import importlib.util

import pytest
import torch

from pyvf.integrations.verl import FusedLinearForPPO, fused_linear_for_ppo, linear_cross_entropy, patch_verl

HAVE_VERL = importlib.util.find_spec("verl") is not None
NO_VERL = "verl is not installed here; bash .ci/trl.sh installs verl==0.9.1 in its virtual environment"


def rel_err(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    diff, scale = (out - ref).norm().item(), ref.norm().item()
    return diff / scale if scale > 0 else diff


def reference(hidden, weight, ids, temperature):
    """float64: log softmax(h W^T / T)[id] and the entropy of that distribution."""
    logits = hidden.double() @ weight.double().T / temperature
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def inputs(shape, h, v, dtype=torch.float32):
    hidden = torch.randn(*shape, h, dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, h) / h ** 0.5).to(dtype).requires_grad_(True)
    ids = torch.randint(0, v, shape)
    return hidden, weight, ids


@pytest.mark.parametrize("shape,h,v,temperature", [((2, 7), 16, 50, 1.0), ((13,), 24, 1001, 0.6), ((1, 1), 8, 3, 1.3)])
def test_contract_against_float64(shape, h, v, temperature):
    hidden, weight, ids = inputs(shape, h, v)
    logp, entropy = fused_linear_for_ppo(hidden, weight, ids, temperature)
    assert logp.shape == ids.shape and entropy.shape == ids.shape
    assert logp.dtype == torch.float32 and entropy.dtype == hidden.dtype
    ref_logp, ref_entropy = reference(hidden, weight, ids, temperature)
    assert rel_err(logp, ref_logp) < 1e-5 and rel_err(entropy, ref_entropy) < 1e-5
    gl, ge = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    d_hidden, d_weight = torch.autograd.grad((logp * gl).sum() + (entropy * ge).sum(), (hidden, weight))
    ref_dh, ref_dw = torch.autograd.grad((ref_logp * gl).sum() + (ref_entropy * ge).sum(), (hidden, weight))
    assert rel_err(d_hidden, ref_dh) < 1e-5 and rel_err(d_weight, ref_dw) < 1e-5


def test_module_and_triton_backend_signatures():
    hidden, weight, ids = inputs((3, 5), 16, 40)
    logp, entropy = FusedLinearForPPO(chunk_size=4, impl_backend="torch")(hidden, weight, ids, 0.8)
    flat_logp, flat_entropy = linear_cross_entropy(hidden, weight, ids, 0.8, "none")
    assert torch.equal(flat_logp, logp.reshape(-1)) and torch.equal(flat_entropy, entropy.reshape(-1).float())
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, ids, 0.8, "mean")
    with pytest.raises(ValueError, match="input_ids"):
        fused_linear_for_ppo(hidden, weight, ids[:, :4])
    with pytest.raises(ValueError, match="impl_backend"):
        FusedLinearForPPO(impl_backend="cuda")


def test_bf16_entropy_keeps_the_hidden_dtype():
    hidden, weight, ids = inputs((4, 6), 32, 257, dtype=torch.bfloat16)
    logp, entropy = fused_linear_for_ppo(hidden, weight, ids)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.bfloat16
    ref_logp, ref_entropy = reference(hidden, weight, ids, 1.0)
    assert rel_err(logp, ref_logp) < 1e-2 and rel_err(entropy, ref_entropy) < 1e-2


@pytest.mark.skipif(not HAVE_VERL, reason=NO_VERL)
def test_equals_verl_fused_linear_for_ppo():
    from verl.utils.experimental.torch_functional import FusedLinearForPPO as VerlFused

    hidden, weight, ids = inputs((2, 9), 16, 301)
    theirs = VerlFused(chunk_size=5, impl_backend="torch")(hidden, weight, ids, 0.7)
    ours = fused_linear_for_ppo(hidden, weight, ids, 0.7)
    gl, ge = torch.randn(2, 9), torch.randn(2, 9)
    grads = [torch.autograd.grad((lp * gl).sum() + (en * ge).sum(), (hidden, weight)) for lp, en in (theirs, ours)]
    for mine, ref in zip(ours, theirs):
        assert mine.dtype == ref.dtype and mine.shape == ref.shape
        assert rel_err(mine, ref) < 1e-5
    for mine, ref in zip(grads[1], grads[0]):
        assert rel_err(mine, ref) < 1e-5


@pytest.mark.skipif(not HAVE_VERL, reason=NO_VERL)
def test_patch_verl_switches_the_model_forward():
    import verl.utils.experimental.torch_functional as tf
    import verl.utils.kernel.linear_cross_entropy as lce
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from verl.models.transformers.dense_common import forward_with_torch_backend

    cfg = Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(cfg).float()
    ids = torch.randint(0, 97, (2, 10))
    saved = (tf.FusedLinearForPPO, lce.linear_cross_entropy)
    try:
        out_verl = forward_with_torch_backend(model, input_ids=ids, return_dict=True, temperature=0.9)
        assert sorted(patch_verl()) == ["verl.utils.experimental.torch_functional.FusedLinearForPPO",
                                        "verl.utils.kernel.linear_cross_entropy.linear_cross_entropy"]
        assert tf.FusedLinearForPPO is FusedLinearForPPO
        out_pyvf = forward_with_torch_backend(model, input_ids=ids, return_dict=True, temperature=0.9)
    finally:
        tf.FusedLinearForPPO, lce.linear_cross_entropy = saved
    assert rel_err(out_pyvf.log_probs, out_verl.log_probs) < 1e-5
    assert rel_err(out_pyvf.entropy, out_verl.entropy) < 1e-5
