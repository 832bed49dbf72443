"""Greedy evaluation: the last \\boxed{...} of each completion, compared with every
reference (8/5 == 1.6; math-verify when installed). Prompts are rendered as in
training (chat template when the tokenizer has one), and generation stops at EOS or
the stop strings (`</answer>` by default, so a PCL model's self-evaluation after its
answer costs nothing when serving)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from pyvf.chat import render_prompt_ids, stop_token_ids
from pyvf.data import dataset
from pyvf.data.answers import is_equivalent, last_boxed
from pyvf.data.dataset import Example
from pyvf.options import add_options, from_args, option
from pyvf.runtime.model import load_model_and_tokenizer
from pyvf.runtime.rollout import greedy
from pyvf.workflows.common import PromptOptions, prompting, stop_strings

HELP = "greedy accuracy of a model on a dataset"


def evaluate(model, tokenizer, examples: list[Example], *, max_new_tokens: int = 64, prompt_template: str = "",
             chat_template: str = "auto", system_prompt: str = "", assistant_prefix: str = "",
             stop: tuple[str, ...] = ("</answer>",), batch_size: int = 64) -> dict:
    prompts = [render_prompt_ids(tokenizer, ex.question, template=prompt_template, chat_template=chat_template,
                                 system_prompt=system_prompt, assistant_prefix=assistant_prefix) for ex in examples]
    outputs = greedy(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size, stop=list(stop),
                     stop_token_ids=stop_token_ids(model, tokenizer))
    details = []
    for ex, out in zip(examples, outputs):
        text = tokenizer.decode(out, skip_special_tokens=True)
        pred = last_boxed(text)
        details.append({"question": ex.question, "answers": list(ex.answers), "prediction": pred,
                        "correct": is_equivalent(pred, list(ex.answers)), "completion": text,
                        "completion_tokens": len(out)})
    correct = sum(d["correct"] for d in details)
    return {"accuracy": correct / max(len(details), 1), "correct": correct, "n": len(details), "details": details}


def evaluate_path(model_spec: str, data: str, limit: int | None, max_new_tokens: int, **prompting) -> dict:
    """`evaluate` of a model directory (or builtin) on the held-out split of `data`."""
    model, tokenizer = load_model_and_tokenizer(model_spec)
    examples = dataset.load(data, n_synthetic=limit or 500, split="eval")
    if limit is not None:
        examples = examples[:limit]
    return evaluate(model, tokenizer, examples, max_new_tokens=max_new_tokens, **prompting)


@dataclass
class EvalOptions(PromptOptions):
    model: str = option("builtin", "model directory, a run, or builtin")
    data: str = option("synthetic", "JSONL file of question/answer rows, or synthetic (held out)")
    limit: int | None = option(None, "evaluate only the first N questions", minimum=1)
    max_new_tokens: int = option(64, "longest completion", minimum=1)
    stop: str = option("</answer>", "stop strings, | separated (\"\" for EOS only)")
    output: str = option("eval.json", "JSON file for the result")


def add_args(parser: argparse.ArgumentParser) -> None:
    add_options(parser, EvalOptions)


def main(args: argparse.Namespace) -> int:
    opts = from_args(EvalOptions, args)
    result = evaluate_path(opts.model, opts.data, opts.limit, opts.max_new_tokens, stop=stop_strings(opts.stop),
                           **prompting(opts, opts.data))
    print(f"eval: accuracy {100 * result['accuracy']:.1f}% ({result['correct']}/{result['n']}) "
          f"model {opts.model} data {opts.data}")
    Path(opts.output).write_text(json.dumps(result, indent=2))
    print(f"eval: wrote {opts.output}")
    return 0
