"""The HF rollout engine (batched sampling loop, per-prompt reproducible), greedy
decoding and stop strings, on the shipped model."""

import copy
import math

import pytest
import torch

from pyvf.data.synthetic import PROMPT_TEMPLATE
from pyvf.runtime.model import load_model_and_tokenizer
from pyvf.runtime.rollout.hf import HFGenerate, StopChecker, greedy
from pyvf.runtime.rollout.seeding import as_int64, gumbel_noise, row_key, sample_tokens, splitmix64, splitmix64_tensor
from pyvf.runtime.rollout.vllm import VLLMEngine, vllm_available

QUESTIONS = ["What is 3 + 4?", "What is 12 * 7 + 1?", "What is 9 - 5?"]
STOP = ["</answer>"]


@pytest.fixture(scope="module")
def hf():
    return load_model_and_tokenizer("builtin")


@pytest.fixture(scope="module")
def prompts(hf):
    _, tok = hf
    return [tok(PROMPT_TEMPLATE.format(question=q), add_special_tokens=False)["input_ids"] for q in QUESTIONS]


def ids_of(group):
    return [c.ids for c in group]


def test_splitmix64_tensor_matches_the_integer_definition():
    xs = [0, 1, 12345, 2**63 - 1, 2**63, 2**64 - 1] + [int(v) for v in torch.randint(0, 2**62, (20,))]
    got = splitmix64_tensor(torch.tensor([as_int64(x) for x in xs])).tolist()
    assert [v & (2**64 - 1) for v in got] == [splitmix64(x) for x in xs]


def test_gumbel_max_samples_the_softmax():
    """Frequencies of sample_tokens over many independent keys match softmax(scores)."""
    scores = torch.tensor([0.0, 1.0, -1.0, 2.0, -3.0])
    rows = 40000
    keys = torch.tensor([as_int64(row_key(int(torch.randint(0, 2**62, ())), j)) for j in range(rows)])
    tokens = sample_tokens(scores.expand(rows, -1), keys, step=3)
    freq = torch.bincount(tokens, minlength=5).double() / rows
    probs = torch.softmax(scores.double(), -1)
    assert (freq - probs).abs().max() < 4 * math.sqrt(0.25 / rows)  # 4 sigma
    noise = gumbel_noise(keys[:2000], 0, 50)
    # The Gumbel mean is the Euler-Mascheroni constant, its std pi / sqrt(6): 5 sigma of the mean.
    assert abs(noise.mean().item() - 0.5772) < 5 * (math.pi / math.sqrt(6)) / math.sqrt(noise.numel())
    assert not torch.equal(gumbel_noise(keys[:4], 0, 50), gumbel_noise(keys[:4], 1, 50))


def test_samples_depend_only_on_prompt_and_seed(hf, prompts):
    model, tok = hf
    engine = HFGenerate(model, tok)
    kw = dict(max_new_tokens=24, temperature=1.0, stop=[])
    alone = engine.generate([prompts[1]], 4, seeds=[99], **kw)[0]
    # other prompts of other lengths around it: different padding, batch size and position
    batch = engine.generate([prompts[2], prompts[0], prompts[1]], 4, seeds=[5, 6, 99], **kw)
    assert ids_of(alone) == ids_of(batch[2])
    for a, b in zip(alone, batch[2]):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    # sample j does not depend on n either
    assert ids_of(engine.generate([prompts[1]], 2, seeds=[99], **kw)[0]) == ids_of(alone)[:2]
    assert ids_of(engine.generate([prompts[1]], 4, seeds=[100], **kw)[0]) != ids_of(alone)
    assert len({tuple(c.ids) for c in batch[0] + batch[1]}) > 2


def test_logprobs_are_the_processed_sampling_logprobs(hf, prompts):
    model, tok = hf
    temperature = 0.7
    out = HFGenerate(model, tok).generate(prompts[:2], 3, max_new_tokens=20, temperature=temperature,
                                          seeds=[1, 2], stop=[])
    reference = copy.deepcopy(model).double()
    for p, group in zip(prompts, out):
        for c in group:
            assert len(c.ids) == len(c.logprobs) > 0
            with torch.no_grad():
                logits = reference(torch.tensor([p + c.ids])).logits[0, len(p) - 1:-1] / temperature
            want = torch.log_softmax(logits, -1).gather(1, torch.tensor(c.ids)[:, None]).squeeze(1)
            assert (torch.tensor(c.logprobs, dtype=torch.float64) - want).abs().max() < 1e-5


def test_completions_end_at_stop_strings_eos_or_length(hf, prompts):
    model, tok = hf
    checker = StopChecker(tok, STOP)
    max_new = 48
    out = HFGenerate(model, tok).generate(prompts, 6, max_new_tokens=max_new, temperature=1.0,
                                          seeds=[7, 8, 9], stop=STOP)
    finishes = {c.finish for group in out for c in group}
    assert "stop" in finishes
    for c in (c for group in out for c in group):
        first = next((t + 1 for t in range(len(c.ids)) if checker(c.ids[:t + 1])), None)
        if c.finish == "stop":
            assert tok.decode(c.ids, skip_special_tokens=True).endswith("</answer>")
            assert first == len(c.ids) and not c.truncated
        elif c.finish == "eos":
            assert c.ids[-1] == tok.eos_token_id and first is None
        else:
            assert c.finish == "length" and c.truncated and len(c.ids) == max_new and first is None
    # without stop strings the same samples run on past the answer
    free = HFGenerate(model, tok).generate(prompts, 6, max_new_tokens=max_new, temperature=1.0,
                                           seeds=[7, 8, 9], stop=[])
    for group, free_group in zip(out, free):
        for c, f in zip(group, free_group):
            assert f.ids[:len(c.ids)] == c.ids
            if c.finish == "stop":
                assert len(f.ids) > len(c.ids)


def test_every_stop_token_id_ends_a_completion_and_no_pad_token_is_needed(hf, prompts):
    model, tok = hf
    tok = copy.deepcopy(tok)
    tok.pad_token = None
    assert tok.pad_token_id is None
    # the " =" of every worked step as a second "EOS": most samples end there
    extra = tok(" =", add_special_tokens=False)["input_ids"][-1]
    engine = HFGenerate(model, tok, stop_token_ids=[tok.eos_token_id, extra])
    out = engine.generate(prompts, 4, max_new_tokens=40, temperature=1.0, seeds=[1, 2, 3], stop=[])
    ended = [c for group in out for c in group if c.finish == "eos"]
    assert any(c.ids[-1] == extra for c in ended)
    for c in ended:
        assert c.ids[-1] in (tok.eos_token_id, extra)
        assert extra not in c.ids[:-1] and tok.eos_token_id not in c.ids[:-1]


def test_greedy_matches_hf_generate_and_stops_at_stop_strings(hf, prompts):
    model, tok = hf
    got = greedy(model, tok, prompts, 40, batch_size=2)
    for p, g in zip(prompts, got):
        out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             do_sample=False, max_new_tokens=40, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)[0, len(p):].tolist()
        if tok.eos_token_id in out:
            out = out[:out.index(tok.eos_token_id)]
        assert g == out
    stopped = greedy(model, tok, prompts, 40, stop=STOP)
    assert any(tok.decode(s).endswith("</answer>") for s in stopped)
    for s, g in zip(stopped, got):
        assert g[:len(s)] == s
        text = tok.decode(s)
        assert "</answer>" not in text or (text.endswith("</answer>") and text.count("</answer>") == 1)


def test_temperature_zero_is_greedy(hf, prompts):
    model, tok = hf
    out = HFGenerate(model, tok).generate(prompts, 2, max_new_tokens=40, temperature=0.0, seeds=[1, 2, 3], stop=STOP)
    want = greedy(model, tok, prompts, 40, stop=STOP)
    for group, w in zip(out, want):
        assert len(group) == 2
        for c in group:  # greedy() leaves the EOS out
            assert (c.ids[:-1] if c.finish == "eos" else c.ids) == w


def test_bad_arguments_are_value_errors(hf, prompts):
    model, tok = hf
    engine = HFGenerate(model, tok)
    kw = dict(max_new_tokens=4, temperature=1.0, stop=[])
    with pytest.raises(ValueError, match="seeds"):
        engine.generate(prompts, 2, seeds=[1], **kw)
    with pytest.raises(ValueError, match="n must"):
        engine.generate(prompts[:1], 0, seeds=[1], **kw)
    with pytest.raises(ValueError, match="temperature"):
        engine.generate(prompts[:1], 1, seeds=[1], max_new_tokens=4, temperature=-1.0, stop=[])
    with pytest.raises(ValueError, match="stop"):
        engine.generate(prompts[:1], 1, seeds=[1], max_new_tokens=4, temperature=1.0, stop="</answer>")
    with pytest.raises(ValueError, match="prompts"):
        engine.generate([[]], 1, seeds=[1], **kw)


def test_min_new_tokens_forbids_eos_at_first_and_keeps_the_model_logprobs(hf, prompts):
    """After a finished answer EOS is the likely next token; with min_new_tokens=1 the
    first token is something else, and its reported log-prob is still the model's own
    (the trainer's), not that of the masked distribution."""
    model, tok = hf
    engine = HFGenerate(model, tok)
    done = [p + tok(" 3 + 4 = 7. <answer> \\boxed{7} </answer>", add_special_tokens=False)["input_ids"]
            for p in prompts[:1]]
    kw = dict(max_new_tokens=3, temperature=1e-3, seeds=[5], stop=[])
    free, = engine.generate(done, 1, **kw)
    assert free[0].ids[0] == tok.eos_token_id and free[0].finish == "eos"
    forced, = engine.generate(done, 1, min_new_tokens=1, **kw)
    first = forced[0].ids[0]
    assert first != tok.eos_token_id
    with torch.no_grad():
        logits = model(torch.tensor([done[0]])).logits[0, -1].double()
    want = torch.log_softmax(logits / 1e-3, -1)[first]
    assert forced[0].logprobs[0] == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(ValueError, match="min_new_tokens"):
        engine.generate(done, 1, min_new_tokens=4, **kw)
    assert engine.generate([], 1, max_new_tokens=3, temperature=1.0, seeds=[], stop=[]) == []


@pytest.mark.skipif(vllm_available(), reason="vLLM is installed here (tests/engine_vllm/ covers the engine)")
def test_vllm_engine_without_vllm_says_what_to_install(tmp_path):
    with pytest.raises(ImportError, match="pip install vllm") as e:
        VLLMEngine.from_model(tmp_path)
    assert "\n" not in str(e.value)


def test_gumbel_noise_is_finite_at_the_largest_draw(monkeypatch):
    """The largest 24-bit draw rounds to u = 1 in float32; the noise must stay finite."""
    import pyvf.runtime.rollout.seeding as seeding

    monkeypatch.setattr(seeding, "splitmix64_tensor", lambda x: torch.full_like(x, -1))  # all bits set
    noise = seeding.gumbel_noise(torch.zeros(2, dtype=torch.int64), 0, 8)
    assert torch.isfinite(noise).all() and noise.min() > 10  # the largest draw: a large, finite noise
