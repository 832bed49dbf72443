"""Prompts and stop tokens for real model directories (instruct and base models from the
hub): the tokenizer's chat template when it has one, every EOS id of the model's
generation config, and a vocabulary check.

With a chat template the question, rendered through the prompt template, becomes the
user turn; an optional system turn goes before it; the generation prompt opens the
assistant turn and `assistant_prefix` is appended to it. The official VeriFree runs
put the reasoning prompt in the user turn and, for thinking models, start the
assistant turn with "<think>": that is `assistant_prefix="<think>"`.
"""

from __future__ import annotations

from collections.abc import Iterable

from pyvf.data.synthetic import PROMPT_TEMPLATE

CHAT_TEMPLATE_MODES = ("auto", "none")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def uses_chat_template(tokenizer, chat_template: str = "auto") -> bool:
    """Whether prompts go through the tokenizer's chat template: `chat_template` is
    "auto" and the tokenizer has one."""
    if chat_template not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"chat_template must be one of {', '.join(CHAT_TEMPLATE_MODES)}, got {chat_template!r}")
    return chat_template == "auto" and has_chat_template(tokenizer)


def describe(tokenizer, *, chat_template: str = "auto", system_prompt: str = "", assistant_prefix: str = "") -> str:
    """One line for the log saying how prompts are rendered."""
    if uses_chat_template(tokenizer, chat_template):
        parts = ["prompts: the tokenizer's chat template (question in the user turn"]
        if system_prompt:
            parts.append(", a system turn")
        if assistant_prefix:
            parts.append(f", assistant turn starts with {assistant_prefix!r}")
        return "".join(parts) + ")"
    why = "chat_template is none" if chat_template == "none" else "the tokenizer has no chat template"
    return f"prompts: plain text template, no chat template ({why})"


def _user_text(question: str, template: str) -> str:
    return (template or PROMPT_TEMPLATE).format(question=question)


def encode_with_leading_specials(tokenizer, text: str) -> list[int]:
    """`text` encoded, preceded by the special tokens the tokenizer puts in front of
    every encoding by default (a base model's BOS, as in pretraining), but without any
    it appends (an EOS would end the prompt)."""
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    full = tokenizer(text, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start] + plain
    return plain  # a post-processor that rewrites the text's tokens: leave them alone


def render_prompt_ids(tokenizer, question: str, *, template: str = "", chat_template: str = "auto",
                      system_prompt: str = "", assistant_prefix: str = "",
                      messages: tuple[tuple[str, str], ...] | None = None) -> list[int]:
    """The token ids of one prompt.

    `template` (default: the synthetic task's PROMPT_TEMPLATE) must contain {question}.
    With a chat template in use (see `uses_chat_template`), the rendered template is
    the user turn, `system_prompt` (if any) the system turn, the generation prompt opens
    the assistant turn and `assistant_prefix` follows it. The chat template writes its
    own BOS (as in `apply_chat_template(tokenize=True)`), so no special tokens are added
    when encoding. Without one the text is `system_prompt`, a blank line, the rendered
    template and `assistant_prefix`, after the BOS the tokenizer adds by default (none
    for the shipped tokenizer or Qwen's, one for Llama's).

    `messages` ((role, content) pairs, a data set's chat prompt) replace the question and
    the template: rendered as given (`system_prompt` only where they have no system turn);
    without a chat template their contents are joined by blank lines."""
    if template and "{question}" not in template:
        raise ValueError(f"template must contain {{question}}, got {template!r}")
    if messages:
        turns = [{"role": role, "content": content} for role, content in messages]
        if system_prompt and not any(t["role"] == "system" for t in turns):
            turns = [{"role": "system", "content": system_prompt}] + turns
    else:
        turns = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": _user_text(question, template)}]
    if not uses_chat_template(tokenizer, chat_template):
        text = "\n\n".join(t["content"] for t in turns) + assistant_prefix
        return encode_with_leading_specials(tokenizer, text)
    messages = turns
    from jinja2.exceptions import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as err:  # raised by the template itself, e.g. "System role not supported"
        what = "system_prompt" if system_prompt else "chat_template"
        raise ValueError(f"{what}: the tokenizer's chat template failed to render the prompt: {err}") from err
    return tokenizer(text + assistant_prefix, add_special_tokens=False)["input_ids"]


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def stop_token_ids(model, tokenizer=None) -> list[int]:
    """Every token id that ends a completion: the EOS ids of the model's generation
    config (an int or a list; Qwen's instruct models list <|im_end|> and
    <|endoftext|>; the model config's when the generation config has none), then the
    tokenizer's EOS; without duplicates, in that order. `model` may be anything with
    `generation_config` and `config` attributes (e.g. a SimpleNamespace of the two
    read from a model directory)."""
    model_ids = _as_ids(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    if not model_ids:  # a model built in code, without a generation config
        model_ids = _as_ids(getattr(getattr(model, "config", None), "eos_token_id", None))
    candidates: Iterable[int] = [*model_ids, *_as_ids(getattr(tokenizer, "eos_token_id", None))]
    ids = list(dict.fromkeys(i for i in candidates if i >= 0))
    if not ids:
        raise ValueError("model: no EOS token id in the model's generation config nor in the tokenizer; "
                         "set eos_token_id in generation_config.json")
    return ids


def check_vocabulary(model, tokenizer) -> None:
    """ValueError when the model cannot score every token id of the tokenizer: its
    output embedding has fewer rows than the tokenizer has tokens. (More rows is
    common: vocabularies are padded to a multiple of 64 or 128.)"""
    output = model.get_output_embeddings()
    rows = output.weight.shape[0] if output is not None else model.config.vocab_size
    if rows < len(tokenizer):
        raise ValueError(
            f"model: its vocabulary has {rows} tokens (output embedding rows) but its tokenizer has "
            f"{len(tokenizer)}: token ids {rows}..{len(tokenizer) - 1} have no embedding. The tokenizer does not "
            f"belong to this model, or tokens were added to it without model.resize_token_embeddings(len(tokenizer))")


def ensure_pad_token(tokenizer, stop_ids: list[int]) -> bool:
    """Gives a tokenizer without a pad token one: its EOS (or the first stop id).
    Returns whether it had to.

    Safe in pyvf because a pad token is never read as text: left padding in greedy
    evaluation is masked out, what `generate` writes after a finished row is cut at
    the first stop token, and training targets come from the packed sequences, not
    from a pad mask (the usual worry with pad = EOS, that EOS gets masked out of the
    labels, does not apply). No token is added, so the vocabulary is unchanged."""
    if tokenizer.pad_token_id is not None:
        return False
    if tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(stop_ids[0])
    return True
