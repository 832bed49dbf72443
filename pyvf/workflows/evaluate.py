"""Greedy evaluation: the last \\boxed{...} of each completion, compared with every
reference (8/5 == 1.6; math-verify when installed). Prompts are rendered as in
training (chat template when the tokenizer has one), and generation stops at EOS or
the stop strings (`</answer>` by default, so a PCL model's self-evaluation after its
answer costs nothing when serving).

The long-answer task (`synthetic-long`, a worked solution as the reference) has no
checker of its answers; `evaluate_long` measures instead the reference's per-token
log-likelihood after the model's own reasoning, and the short task's accuracy on the
last number of the answer the model committed to."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

from pyvf.chat import render_prompt_ids, stop_token_ids
from pyvf.data import dataset
from pyvf.data.answers import is_equivalent, last_boxed
from pyvf.data.dataset import Example
from pyvf.options import add_options, from_args, option
from pyvf.runtime.model import load_model_and_tokenizer
from pyvf.runtime.policy import Policy
from pyvf.runtime.rollout import greedy
from pyvf.splice import DEFAULT_ANSWER_TEMPLATE, DEFAULT_MARKER
from pyvf.verify.verifree import verifree_scores
from pyvf.workflows.common import PromptOptions, prompting, stop_strings

HELP = "greedy accuracy of a model on a dataset"


def evaluate(model, tokenizer, examples: list[Example], *, max_new_tokens: int = 64, prompt_template: str = "",
             chat_template: str = "auto", system_prompt: str = "", assistant_prefix: str = "",
             stop: tuple[str, ...] = ("</answer>",), batch_size: int = 64) -> dict:
    prompts = [render_prompt_ids(tokenizer, ex.question, template=prompt_template, chat_template=chat_template,
                                 system_prompt=system_prompt, assistant_prefix=assistant_prefix, messages=ex.messages)
               for ex in examples]
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


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


def final_number(text: str) -> str | None:
    """The last number of the answer a completion committed to (its last \\boxed{...})."""
    numbers = _NUMBER.findall(last_boxed(text) or "")
    return numbers[-1] if numbers else None


def evaluate_long(model, tokenizer, examples: list[Example], short_examples: list[Example], *,
                  max_new_tokens: int = 64, prompt_template: str = "", chat_template: str = "auto",
                  system_prompt: str = "", assistant_prefix: str = "", stop: tuple[str, ...] = ("</answer>",),
                  batch_size: int = 64, token_budget: int = 8192) -> dict:
    """Held-out metrics of a long-answer task that need no checker of long answers:
    `reference_loglik`, the mean over questions of the reference's per-token
    log-likelihood after the model's own greedy reasoning (the marker appended where it
    wrote none), and `accuracy`, whether the last number of its answer is the short
    task's answer (`short_examples`, the same questions)."""
    if len(short_examples) != len(examples):
        raise ValueError(f"short_examples must pair with examples, got {len(short_examples)} and {len(examples)}")
    prompts = [render_prompt_ids(tokenizer, ex.question, template=prompt_template, chat_template=chat_template,
                                 system_prompt=system_prompt, assistant_prefix=assistant_prefix, messages=ex.messages)
               for ex in examples]
    outputs = greedy(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size, stop=list(stop),
                     stop_token_ids=stop_token_ids(model, tokenizer))
    device = model.get_output_embeddings().weight.device
    loglik = verifree_scores(Policy(model), tokenizer, prompts, outputs, [list(ex.answers) for ex in examples],
                             [list(ex.weights) for ex in examples], temperature=1.0, device=device,
                             marker=DEFAULT_MARKER, answer_template=DEFAULT_ANSWER_TEMPLATE, max_seq_len=None,
                             token_budget=token_budget, reward_form="mean_logprob")
    details = []
    for ex, short, out, ll in zip(examples, short_examples, outputs, loglik.tolist()):
        text = tokenizer.decode(out, skip_special_tokens=True)
        pred = final_number(text)
        details.append({"question": ex.question, "reference": ex.answers[0], "answers": list(short.answers),
                        "prediction": pred, "correct": is_equivalent(pred, list(short.answers)),
                        "reference_loglik": ll, "completion": text, "completion_tokens": len(out)})
    n = max(len(details), 1)
    correct = sum(d["correct"] for d in details)
    return {"accuracy": correct / n, "correct": correct, "n": len(details),
            "reference_loglik": sum(d["reference_loglik"] for d in details) / n, "details": details}


def evaluate_path(model_spec: str, data: str, limit: int | None, max_new_tokens: int, **prompting) -> dict:
    """`evaluate` of a model directory (or builtin) on the held-out split of `data`
    (`evaluate_long` for synthetic-long)."""
    model, tokenizer = load_model_and_tokenizer(model_spec)
    examples = dataset.load(data, n_synthetic=limit or 500, split="eval")
    if limit is not None:
        examples = examples[:limit]
    if data == "synthetic-long":
        short = dataset.load("synthetic", n_synthetic=len(examples), split="eval")
        return evaluate_long(model, tokenizer, examples, short, max_new_tokens=max_new_tokens, **prompting)
    return evaluate(model, tokenizer, examples, max_new_tokens=max_new_tokens, **prompting)


@dataclass
class EvalOptions(PromptOptions):
    model: str = option("builtin", "model directory, a run, or builtin")
    data: str = option("synthetic", "a JSONL, JSON, Parquet or CSV file or a `datasets` directory of question/answer "
                                    "rows (as `pyvf train --data`), or synthetic / synthetic-long (held out)")
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
    print(f"eval: accuracy {100 * result['accuracy']:.1f}% ({result['correct']}/{result['n']}"
          + (f", on the final number; reference log-likelihood {result['reference_loglik']:.3f} per token"
             if "reference_loglik" in result else "") + f") model {opts.model} data {opts.data}")
    Path(opts.output).write_text(json.dumps(result, indent=2))
    print(f"eval: wrote {opts.output}")
    return 0
