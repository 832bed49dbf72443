import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers_for_tests import ALL

from pyvf.splice import DEFAULT_ANSWER_TEMPLATE, splice_reference

MARKER = "<answer"
TOKENIZERS = list(ALL)


def decode(tok, ids):
    return tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def check(tok, ids, reference, template=DEFAULT_ANSWER_TEMPLATE):
    """Every property of docs/algorithms.md / issue 4, from the definitions."""
    out = splice_reference(tok, ids, reference, answer_template=template)
    text = decode(tok, ids)
    pos = text.find(MARKER)
    assert out.found == (pos >= 0)
    if pos < 0:
        assert out.reasoning_ids == list(ids) and out.answer_ids == [] and out.n_kept == len(ids)
        return out
    assert decode(tok, out.reasoning_ids) == text[:pos] + MARKER
    # Every sampled token whose text ends at or before the marker is kept verbatim.
    kept = max(k for k in range(len(ids) + 1) if text[:pos].startswith(decode(tok, ids[:k])))
    assert out.n_kept == kept
    assert out.reasoning_ids[:kept] == list(ids[:kept])
    rendered = template.format(ref=reference)
    assert out.answer_ids == encode(tok, rendered)
    # The span covers the reference, and each end token is needed to cover it.
    span = out.answer_ids[out.reference_span]
    assert reference.strip() in decode(tok, span) or reference in decode(tok, span)
    assert reference not in decode(tok, span[1:]) and reference not in decode(tok, span[:-1])
    return out


@pytest.mark.parametrize("name", TOKENIZERS)
def test_reference_completion(name):
    tok = ALL[name]()
    text = " 3 * 7 = 21. 21 / 2 = 21/2. <answer> \\boxed{21/2} </answer>"
    out = check(tok, encode(tok, text), "10.5")
    assert out.found
    assert decode(tok, out.reasoning_ids).endswith("21/2. <answer")


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("text", [
    "so the result is 4.<answer> \\boxed{4} </answer>",       # marker glued to the previous character
    "答案是八分之五<answer>\\boxed{8/5}</answer>",               # CJK right before the marker
    "naïve 😀<answer",                                          # emoji, marker at the very end
    "<answer> first thing",                                     # marker at the very start
    "no marker here at all",
    "<answ almost but not <answer> then <answer> again",        # near miss, repeated marker
    "   lots   of   spaces   <answer>",
    "line one\nline two\n<answer>\n",
])
def test_edge_texts(name, text):
    tok = ALL[name]()
    check(tok, encode(tok, text), "8/5")


def test_special_token_containing_marker_is_not_kept():
    tok = ALL["bpe-special-answer"]()
    special = tok.convert_tokens_to_ids("<answer>")
    ids = encode(tok, "21 / 2 = 21/2. ") + [special] + encode(tok, " \\boxed{21/2} ")
    out = check(tok, ids, "21/2")
    assert special not in out.reasoning_ids
    assert out.n_kept == len(ids) - len(encode(tok, " \\boxed{21/2} ")) - 1


def test_marker_merged_with_previous_character_is_retokenized():
    tok = ALL["bpe"]()
    ids = encode(tok, "= 13.<answer> \\boxed{13} </answer>")
    pieces = tok.convert_ids_to_tokens(ids)
    out = check(tok, ids, "13")
    # The token holding "<" (possibly with "." glued on) ends after the cut: re-tokenized.
    first_marker_token = next(i for i, p in enumerate(pieces) if "<" in p)
    assert out.n_kept == first_marker_token


def test_multi_reference_and_tensor_input():
    tok = ALL["bpe"]()
    ids = torch.tensor(encode(tok, "8 / 5 = 8/5. <answer> \\boxed{8/5} </answer>"))
    outs = splice_reference(tok, ids, ["8/5", "1.6"])
    assert [o.reference for o in outs] == ["8/5", "1.6"]
    assert outs[0].reasoning_ids == outs[1].reasoning_ids
    assert decode(tok, outs[1].answer_ids[outs[1].reference_span]).strip() == "1.6"


def test_custom_template():
    tok = ALL["bpe"]()
    check(tok, encode(tok, "x <answer> y"), "42", template="> The answer is {ref}. </answer>")
    with pytest.raises(ValueError, match="answer_template must contain"):
        splice_reference(tok, encode(tok, "x <answer"), "42", answer_template="> no slot </answer>")


@pytest.mark.parametrize("bad", ["", "   ", "\n\t"])
def test_empty_reference_is_an_error(bad):
    tok = ALL["bpe"]()
    with pytest.raises(ValueError, match="reference must be a non-empty"):
        splice_reference(tok, encode(tok, "x <answer"), bad)
    with pytest.raises(ValueError, match="reference must be a non-empty"):
        splice_reference(tok, encode(tok, "x <answer"), ["8/5", bad])


# --- property-based ---------------------------------------------------------------

PIECES = st.sampled_from([
    "<answer", "<answer>", "<", "ans", "wer", ">", ".", " ", "  ", "\n", "<answ", "er", "1.6", "8/5",
    "\\boxed{", "}", "中", "文", "é", "😀", "= 3", " is", "the", "</answer>", "a", "<<",
])
REFERENCES = st.sampled_from(["8/5", "1.6", "13", "x + 1", "中文", "-2.25", "\\frac{1}{2}"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(TOKENIZERS), pieces=st.lists(PIECES, max_size=14), reference=REFERENCES)
def test_random_texts(name, pieces, reference):
    tok = ALL[name]()
    check(tok, encode(tok, "".join(pieces)), reference)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(TOKENIZERS), data=st.data(), reference=REFERENCES)
def test_random_token_sequences(name, data, reference):
    # Sampled completions need not be canonical tokenizations: random ids, with the
    # marker's characters inserted one token at a time somewhere in the middle.
    tok = ALL[name]()
    vocab = len(tok)
    before = data.draw(st.lists(st.integers(0, vocab - 1), max_size=10))
    after = data.draw(st.lists(st.integers(0, vocab - 1), max_size=6))
    split_marker = [tid for ch in MARKER for tid in encode(tok, ch)]
    with_marker = data.draw(st.booleans())
    ids = before + (split_marker if with_marker else []) + after
    check(tok, ids, reference)
