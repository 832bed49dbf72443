"""Options and steps that several workflows share: how prompts are rendered, how
completions are sampled, and loading a model onto the best device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pyvf.data import openended
from pyvf.data.rubric import CLOSE
from pyvf.options import option
from pyvf.runtime.model import load_model_and_tokenizer


@dataclass
class PromptOptions:
    prompt_template: str | None = option(None, "task prompt with {question} (none: the task's, synthetic or "
                                               "openended)")
    chat_template: str = option("auto", "auto: the tokenizer's chat template when it has one; none: plain text",
                                choices=("auto", "none"))
    system_prompt: str = option("", "system turn (chat templates only)")
    assistant_prefix: str = option("", "text that starts the assistant turn, e.g. <think>")


@dataclass
class SamplingOptions(PromptOptions):
    seed: int = option(0, "sampling seed")
    max_new_tokens: int = option(64, "longest completion sampled", minimum=1)
    temperature: float = option(1.0, "sampling temperature")
    batch_size: int = option(16, "questions sampled together", minimum=1)
    max_seq_len: int = option(512, "longest sequence scored", minimum=1)


def task_defaults(data: str) -> tuple[str, str]:
    """(prompt template, stop strings joined by |) of a data spec: the open-ended task's
    prompt and its rating block's end for `openended`, else the synthetic task's prompt
    ("" = the default) and `</answer>`."""
    if data == "openended":
        return openended.PROMPT_TEMPLATE, CLOSE
    return "", "</answer>"


def prompting(opts: PromptOptions, data: str = "synthetic") -> dict:
    """The keyword arguments that render prompts (`render_prompt_ids`) as `opts` asks."""
    template = opts.prompt_template if opts.prompt_template is not None else task_defaults(data)[0]
    return dict(prompt_template=template, chat_template=opts.chat_template, system_prompt=opts.system_prompt,
                assistant_prefix=opts.assistant_prefix)


def stop_strings(text: str) -> tuple[str, ...]:
    return tuple(s for s in text.split("|") if s)


def load_model(spec: str):
    """A model directory, a run or builtin, on the GPU when there is one."""
    model, tokenizer = load_model_and_tokenizer(spec)
    if torch.cuda.is_available():
        model.to("cuda")
    return model, tokenizer
