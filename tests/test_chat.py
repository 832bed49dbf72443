"""pyvf.chat on a model directory shaped like a hub instruct model (tests/chat_fixtures.py):
chat template, system turn, assistant prefix, BOS, both EOS ids, vocabulary check, no
pad token. Nothing is downloaded."""

import pytest
from chat_fixtures import BOS, ENDOFTEXT, IM_END, chat_model_dir, chat_tokenizer

from pyvf.assets import load_tokenizer
from pyvf.chat import (
    check_vocabulary, describe, ensure_pad_token, render_prompt_ids, stop_token_ids, uses_chat_template,
)
from pyvf.data.synthetic import PROMPT_TEMPLATE
from pyvf.runtime.model import load_model_and_tokenizer

QUESTION = "Tom has 3 apples and buys 5 more. How many?"
USER = PROMPT_TEMPLATE.format(question=QUESTION)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """(model, tokenizer) as pyvf loads them from the saved directory."""
    return load_model_and_tokenizer(str(chat_model_dir(tmp_path_factory.mktemp("chat"))))


def text_of(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False)


def test_plain_prompt_is_todays_encoding_for_the_shipped_tokenizer():
    tok = load_tokenizer()
    assert not uses_chat_template(tok, "auto")
    assert render_prompt_ids(tok, QUESTION) == tok(USER, add_special_tokens=False)["input_ids"]
    custom = "Q: {question}\nA:"
    assert render_prompt_ids(tok, QUESTION, template=custom) == tok(custom.format(question=QUESTION),
                                                                   add_special_tokens=False)["input_ids"]
    assert "no chat template" in describe(tok)


def test_chat_template_makes_the_question_the_user_turn(loaded):
    _, tok = loaded
    assert uses_chat_template(tok, "auto")
    ids = render_prompt_ids(tok, QUESTION)
    expected = f"<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n"
    assert text_of(tok, ids) == expected
    assert ids == tok(expected, add_special_tokens=False)["input_ids"]
    # The role markers are single special tokens, not their characters.
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == im_start and ids.count(im_start) == 2
    assert "chat template" in describe(tok) and "no chat template" not in describe(tok)


def test_chat_template_none_gives_the_plain_prompt(loaded):
    _, tok = loaded
    ids = render_prompt_ids(tok, QUESTION, chat_template="none")
    assert ids == tok(USER, add_special_tokens=False)["input_ids"]
    assert not uses_chat_template(tok, "none")
    assert "chat_template is none" in describe(tok, chat_template="none")


def test_system_prompt_and_assistant_prefix(loaded):
    _, tok = loaded
    ids = render_prompt_ids(tok, QUESTION, system_prompt="Think step by step.", assistant_prefix="<think>")
    assert text_of(tok, ids) == (f"<|im_start|>system\nThink step by step.<|im_end|>\n"
                                 f"<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n<think>")
    assert ids[-1] == tok.convert_tokens_to_ids("<think>")  # one added token, not "<", "think", ">"
    line = describe(tok, system_prompt="x", assistant_prefix="<think>")
    assert "system turn" in line and "'<think>'" in line
    # Without a chat template both still reach the model, as plain text.
    plain = render_prompt_ids(tok, QUESTION, chat_template="none", system_prompt="Be brief.", assistant_prefix=" Let")
    assert text_of(tok, plain) == f"Be brief.\n\n{USER} Let"


def test_bos_written_once(tmp_path):
    _, tok = load_model_and_tokenizer(str(chat_model_dir(tmp_path, bos=True)))
    bos = tok.convert_tokens_to_ids(BOS)
    assert tok("x")["input_ids"][0] == bos  # the reloaded tokenizer adds BOS by default
    for mode in ("auto", "none"):
        ids = render_prompt_ids(tok, QUESTION, chat_template=mode)
        assert ids[0] == bos and ids.count(bos) == 1, mode
    assert tok.decode(render_prompt_ids(tok, QUESTION)).startswith(BOS + "<|im_start|>user\n")


def test_bad_arguments(loaded):
    _, tok = loaded
    with pytest.raises(ValueError, match="chat_template"):
        render_prompt_ids(tok, QUESTION, chat_template="yes")
    with pytest.raises(ValueError, match="template"):
        render_prompt_ids(tok, QUESTION, template="no placeholder")


def test_template_without_system_role_names_system_prompt():
    tok = chat_tokenizer()
    tok.chat_template = ("{%- if messages[0]['role'] == 'system' -%}{{ raise_exception('System role not supported') }}"
                         "{%- endif -%}" + tok.chat_template)
    assert render_prompt_ids(tok, QUESTION)  # fine without one
    with pytest.raises(ValueError, match="system_prompt.*System role not supported"):
        render_prompt_ids(tok, QUESTION, system_prompt="Be brief.")


def test_stop_token_ids_are_every_eos(loaded):
    model, tok = loaded
    im_end, endoftext = tok.convert_tokens_to_ids([IM_END, ENDOFTEXT])
    assert model.generation_config.eos_token_id == [im_end, endoftext]
    assert stop_token_ids(model, tok) == [im_end, endoftext]
    # An int in the generation config, and a tokenizer EOS it does not list: both, once each.
    model.generation_config.eos_token_id = endoftext
    try:
        assert stop_token_ids(model, tok) == [endoftext, im_end]
    finally:
        model.generation_config.eos_token_id = [im_end, endoftext]


def test_stop_token_ids_without_generation_config_or_any_eos():
    from types import SimpleNamespace

    tok = chat_tokenizer()
    im_end, endoftext = tok.convert_tokens_to_ids([IM_END, ENDOFTEXT])
    built_in_code = SimpleNamespace(generation_config=None, config=SimpleNamespace(eos_token_id=endoftext))
    assert stop_token_ids(built_in_code, tok) == [endoftext, im_end]
    tok.eos_token = None
    with pytest.raises(ValueError, match="model: no EOS token id"):
        stop_token_ids(SimpleNamespace(generation_config=None, config=SimpleNamespace(eos_token_id=None)), tok)


def test_vocabulary_smaller_than_tokenizer_is_rejected(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(chat_model_dir(tmp_path, vocab_shortfall=3))
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    with pytest.raises(ValueError, match=rf"model: its vocabulary has {len(tok) - 3} tokens .* tokenizer has {len(tok)}"):
        check_vocabulary(model, tok)
    model.resize_token_embeddings(len(tok) + 5)  # larger than the tokenizer is fine (padded vocabularies)
    check_vocabulary(model, tok)


def test_loads_without_a_pad_token(tmp_path):
    path = chat_model_dir(tmp_path, pad=False)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(path)).pad_token_id is None  # the saved tokenizer really has none
    model, tok = load_model_and_tokenizer(str(path))
    check_vocabulary(model, tok)
    assert tok.pad_token_id == tok.convert_tokens_to_ids(IM_END) and len(tok) == model.config.vocab_size


def test_ensure_pad_token():
    tok = chat_tokenizer(pad=False)
    assert ensure_pad_token(tok, [5]) and tok.pad_token == IM_END
    assert not ensure_pad_token(tok, [5])
    no_eos = chat_tokenizer(pad=False)
    no_eos.eos_token = None
    endoftext = no_eos.convert_tokens_to_ids(ENDOFTEXT)
    assert ensure_pad_token(no_eos, [endoftext]) and no_eos.pad_token_id == endoftext


def test_chat_messages_from_a_data_set_render_as_given(loaded):
    """A data set's chat prompt (verl, TRL): its turns as they are, no task template; the
    system prompt only where the messages have no system turn; joined plainly without a
    chat template."""
    _, tok = loaded
    turns = (("system", "Be brief."), ("user", QUESTION))
    assert text_of(tok, render_prompt_ids(tok, QUESTION, messages=turns, system_prompt="ignored")) == (
        f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    assert text_of(tok, render_prompt_ids(tok, QUESTION, messages=turns[1:], system_prompt="Sys")).startswith(
        "<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\n")
    plain = load_tokenizer()
    assert render_prompt_ids(plain, QUESTION, messages=turns) == plain(f"Be brief.\n\n{QUESTION}",
                                                                      add_special_tokens=False)["input_ids"]
