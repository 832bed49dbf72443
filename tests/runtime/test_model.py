"""Padding-free forward (pyvf.runtime.model.decoder_hidden_states): the log-probs of a
packed batch equal those of each sequence's own forward, for the shipped model (Qwen3)
and randomly initialized tiny Llama and Qwen2 models."""

import logging

import pytest
import torch

from pyvf.ops import token_logprobs
from pyvf.packing import Sequence, pack
from pyvf.runtime.model import (
    _packed_is_cheaper, choose_forward_mode, decoder_hidden_states, load_model_and_tokenizer, set_forward_mode,
)
from pyvf.runtime.policy import Policy


def tiny(arch: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa")
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))


@pytest.fixture(scope="module")
def builtin():
    return load_model_and_tokenizer("builtin")[0]


def random_sequences(vocab, lengths, g):
    """Sequences of the given total lengths with prompt / reasoning / answer parts."""
    seqs = []
    for i, n in enumerate(lengths):
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        a, b = max(1, n // 3), max(1, n // 3) + max(0, n // 2)
        seqs.append(Sequence(ids[:a], ids[a:b], ids[b:], group=i // 2))
    return seqs


def own_forward_logprobs(model, seq: Sequence) -> torch.Tensor:
    """float64 log-probs of each sequence's trained targets from its own full forward."""
    ids = torch.tensor([seq.ids()])
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[0].double()
    batch = pack([seq])
    rows = batch.targets != batch.ignore_index
    lp = torch.log_softmax(logits, -1)[rows].gather(1, batch.targets[rows][:, None]).squeeze(1)
    out = torch.zeros(len(seq), dtype=torch.float64)
    out[rows] = lp
    return out


@pytest.mark.parametrize("arch", ["builtin", "llama", "qwen2"])
def test_packed_logprobs_equal_each_sequence_alone(arch, builtin):
    g = torch.Generator().manual_seed(torch.initial_seed() % 2**31)
    model = builtin if arch == "builtin" else tiny(arch).float()
    model.eval()
    vocab = model.get_input_embeddings().weight.shape[0]
    seqs = random_sequences(vocab, [17, 1, 40, 3, 9, 2], g)
    batch = pack(seqs)
    assert choose_forward_mode(model) == "packed" and _packed_is_cheaper(model, batch)
    with torch.no_grad():
        hidden = decoder_hidden_states(model, batch)
        assert hidden.shape == (batch.input_ids.numel(), model.config.hidden_size)
        got = token_logprobs(hidden, model.get_output_embeddings().weight, batch.targets,
                             ignore_index=batch.ignore_index, backend="reference").double()
    want = torch.cat([own_forward_logprobs(model, s) for s in seqs])
    rows = batch.targets != batch.ignore_index
    assert rows.sum() > 20
    assert (got - want).abs().max().item() < 1e-5
    # the padded layout gives the same, and the packed one is not trivially equal to it
    set_forward_mode(model, "padded")
    try:
        with torch.no_grad():
            padded = decoder_hidden_states(model, batch)
    finally:
        set_forward_mode(model, "packed")
    assert torch.allclose(padded, hidden, atol=1e-5, rtol=1e-5)


def test_packed_gradients_equal_padded(builtin):
    """The backward through the packed layout (block-diagonal mask) matches the padded one."""
    g = torch.Generator().manual_seed(torch.initial_seed() % 2**31)
    model = tiny("llama").float()
    seqs = random_sequences(97, [12, 5, 20], g)
    batch = pack(seqs)
    policy = Policy(model, backend="reference")
    grads = {}
    for mode in ("packed", "padded"):
        set_forward_mode(model, mode)
        model.zero_grad()
        policy(batch).sum().backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    rel = (grads["packed"] - grads["padded"]).norm() / grads["padded"].norm()
    assert rel < 1e-5


def test_model_that_ignores_position_ids_falls_back_to_padded(caplog):
    """A decoder whose attention spans the whole row (no sequence boundaries) cannot take
    packed input: the probe sees it and picks the padded layout, once."""
    model = tiny("qwen2").float()
    decoder = model.get_decoder()
    original = decoder.forward

    def no_boundaries(*args, position_ids=None, attention_mask=None, **kw):
        if attention_mask is None:  # packed call: forget where sequences start
            position_ids = torch.arange(kw["input_ids"].shape[1])[None]
        return original(*args, position_ids=position_ids, attention_mask=attention_mask, **kw)

    decoder.forward = no_boundaries
    with caplog.at_level(logging.INFO, logger="pyvf"):
        assert choose_forward_mode(model) == "padded"
        assert choose_forward_mode(model) == "padded"
    assert sum("policy forward: padded" in r.getMessage() for r in caplog.records) == 1
    seqs = random_sequences(97, [6, 4], torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = token_logprobs(decoder_hidden_states(model, pack(seqs)), model.get_output_embeddings().weight,
                             pack(seqs).targets, backend="reference").double()
    decoder.forward = original
    want = torch.cat([own_forward_logprobs(model, s) for s in seqs])
    assert (got - want).abs().max().item() < 1e-5


def test_layout_per_batch_by_cost(builtin):
    """Without a varlen kernel, a length-skewed batch runs packed (a dense block-diagonal
    mask over 1004 tokens is far cheaper than 64 rows padded to 500) and a batch of equal
    lengths runs padded (no padding to save, and T^2 mask pairs to lose)."""
    skewed = pack([Sequence([1] * 500, [], [], group=0)] + [Sequence([1] * 8, [], [], group=i) for i in range(63)])
    equal = pack([Sequence([1] * 40, [], [], group=i) for i in range(64)])
    assert _packed_is_cheaper(builtin, skewed)
    assert not _packed_is_cheaper(builtin, equal)


def test_set_forward_mode_rejects_unknown_modes():
    with pytest.raises(ValueError, match="mode"):
        set_forward_mode(tiny("llama"), "ragged")
