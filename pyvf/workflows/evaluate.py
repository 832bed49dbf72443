"""`pyvf eval`: a model's accuracy on one or more data sets, as papers report it.

Prompts are rendered as in training (chat template when the tokenizer has one; a data
set's chat messages as given) and decoded by either engine (`--rollout hf|vllm`),
greedily or with k samples per question (`--samples k --temperature t`: avg@k and
pass@k), stopping at EOS or the stop strings (`</answer>` by default, so a PCL model's
self-evaluation after its answer costs nothing when serving). Each answer is read in the
data's answer format (`--answer-format`; auto: choice for multiple-choice data, else
math) and graded (pyvf.runtime.evaluation); a category column gives per-category rows.
One table row per data file; the JSON holds every completion.

The long-answer task (`synthetic-long`, a worked solution as the reference) has no
checker of its answers; `evaluate_long` measures instead the reference's per-token
log-likelihood after the model's own reasoning, and the short task's accuracy on the
last number of the answer the model committed to."""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pyvf.chat import render_prompt_ids, stop_token_ids
from pyvf.data import dataset
from pyvf.data.answers import ANSWER_FORMATS, is_equivalent, last_boxed
from pyvf.data.dataset import Example
from pyvf.data.files import DataKeys
from pyvf.options import ConfigError, add_option, from_args, keys, option
from pyvf.runtime import checkpoint, distributed
from pyvf.runtime.evaluation import (
    check_references, evaluate_examples, format_results, metric_names, prompt_renderer,
)
from pyvf.runtime.model import load_model_and_tokenizer, load_tokenizer, resolve_model_path
from pyvf.runtime.policy import Policy
from pyvf.runtime.rollout import HFGenerate, greedy
from pyvf.splice import DEFAULT_ANSWER_TEMPLATE, DEFAULT_MARKER
from pyvf.verify.verifree import verifree_scores
from pyvf.workflows.common import PromptOptions, prompting, stop_strings

HELP = "accuracy of a model on data sets (greedy, or avg@k / pass@k), per category, on the hf or vllm engine"


def evaluate(model, tokenizer, examples: list[Example], *, max_new_tokens: int = 64, prompt_template: str = "",
             chat_template: str = "auto", system_prompt: str = "", assistant_prefix: str = "",
             stop: tuple[str, ...] = ("</answer>",), batch_size: int = 64) -> dict:
    """Greedy accuracy of a model held in memory, on the HF engine (the workflows'
    held-out check): `pyvf.runtime.evaluation.evaluate_examples`."""
    engine = HFGenerate(model, tokenizer, stop_token_ids=stop_token_ids(model, tokenizer))
    return evaluate_examples(engine, tokenizer, examples, max_new_tokens=max_new_tokens, stop=stop,
                             batch_size=batch_size,
                             render=prompt_renderer(tokenizer, prompt_template=prompt_template,
                                                    chat_template=chat_template, system_prompt=system_prompt,
                                                    assistant_prefix=assistant_prefix))


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
    avg, pass_ = metric_names(1)
    return {"answer_format": "final number", "samples": 1, "temperature": 0.0, "n": len(details),
            avg: correct / n, pass_: correct / n, "accuracy": correct / n, "correct": correct,
            "reference_loglik": sum(d["reference_loglik"] for d in details) / n, "details": details}


def load_eval_examples(data: str, limit: int | None, keys: DataKeys | None = None) -> list[Example]:
    """The questions of `data` that evaluation takes: a file's rows (`keys`), or the
    held-out split of a built-in task; the first `limit` of them."""
    examples = dataset.load(data, n_synthetic=limit or 500, split="eval", keys=keys)
    return examples[:limit] if limit is not None else examples


def evaluate_path(model_spec: str, data: str, limit: int | None, max_new_tokens: int, **prompting) -> dict:
    """`evaluate` of a model directory (or builtin) on the held-out split of `data`
    (`evaluate_long` for synthetic-long)."""
    model, tokenizer = load_model_and_tokenizer(model_spec)
    examples = load_eval_examples(data, limit)
    if data == "synthetic-long":
        short = dataset.load("synthetic", n_synthetic=len(examples), split="eval")
        return evaluate_long(model, tokenizer, examples, short, max_new_tokens=max_new_tokens, **prompting)
    return evaluate(model, tokenizer, examples, max_new_tokens=max_new_tokens, **prompting)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EvalOptions(PromptOptions):
    model: str = option("builtin", "model directory, a run, or builtin")
    data: tuple[str, ...] = option(("synthetic",), "one or more JSONL, JSON, Parquet or CSV files or `datasets` "
                                                   "directories of question/answer rows (as `pyvf train --data`), "
                                                   "or the held-out synthetic, synthetic-long or synthetic-choice "
                                                   "(multiple choice): one row each")
    rollout: str = option("hf", "decoding engine: hf (batched Hugging Face) or vllm", choices=("hf", "vllm"))
    samples: int = option(1, "answers per question: avg@k (mean accuracy) and pass@k over them", minimum=1)
    temperature: float = option(0.0, "0: greedy; > 0: sampled (needed for --samples > 1)", minimum=0)
    answer_format: str = option("auto", "how an answer is read: math (last \\boxed{}, equivalence), choice (the "
                                        "option letter committed to), text (normalized exact match); auto: choice "
                                        "for multiple-choice data, else math", choices=ANSWER_FORMATS)
    seed: int = option(0, "sampling seed (each question samples from its own stream)")
    batch_size: int | None = option(None, "questions per engine call (none: 64 on hf, a whole file on vllm, "
                                          "which schedules its own batches)", minimum=1)
    dtype: str = option("auto", "weights' dtype: auto (the checkpoint's), float32, bfloat16 or float16",
                        choices=("auto", *DTYPES))
    question_key: str = option("", "the question column (\"\": found by name, as pyvf train)")
    answer_key: str = option("", "the reference column (\"\": found by name, as pyvf train)")
    category_key: str = option("", "the category column of per-category rows (\"\": category, subject, "
                                   "data_source or domain, when there)")
    split: str = option("", "the split of a `datasets` directory that holds several (\"\": train, or the only one)")
    limit: int | None = option(None, "evaluate only the first N questions of each data set", minimum=1)
    max_new_tokens: int = option(64, "longest completion", minimum=1)
    stop: str = option("</answer>", "stop strings, | separated (\"\" for EOS only)")
    output: str = option("eval.json", "JSON file for the results, every completion included")


def add_args(parser: argparse.ArgumentParser) -> None:
    for name in keys(EvalOptions):
        if name != "data":
            add_option(parser, EvalOptions, name)
    parser.add_argument("--data", nargs="+", default=list(EvalOptions.data), metavar="DATA",
                        help=f"{keys(EvalOptions)['data'].metadata['help']} (default: synthetic)")


def _dtype(opts: EvalOptions, path: Path) -> torch.dtype:
    if opts.dtype != "auto":
        return DTYPES[opts.dtype]
    config = json.loads((path / "config.json").read_text())
    return DTYPES.get(config.get("dtype") or config.get("torch_dtype") or "float32", torch.float32)


def build_engine(opts: EvalOptions, tokenizer, cache_dir: str, max_model_len: int, device: torch.device):
    """(engine, the HF model or None) of opts.model on opts.rollout: the HF engine on
    `device`, or vLLM reading the model directory (a sharded pyvf checkpoint is written out
    for it first), its context sized to `max_model_len` tokens."""
    path = resolve_model_path(opts.model)
    dtype = _dtype(opts, path)
    if opts.rollout == "hf":
        model, _ = load_model_and_tokenizer(opts.model, dtype)
        model.to(device)
        return HFGenerate(model, tokenizer, stop_token_ids=stop_token_ids(model, tokenizer)), model
    from pyvf.runtime.rollout.vllm import INSTALL_HINT, VLLMEngine, vllm_available

    if not vllm_available():
        raise ConfigError(f"--rollout vllm: {INSTALL_HINT}")
    source = path
    if checkpoint.is_sharded(path):  # DCP shards: vLLM reads a plain model directory
        source, _ = load_model_and_tokenizer(opts.model, dtype)
    engine = VLLMEngine.from_model(source, tokenizer, dtype=dtype, cache_dir=cache_dir, gpu_memory_utilization=0.85,
                                   max_model_len=max_model_len, seed=opts.seed)
    return engine, None


def main(args: argparse.Namespace) -> int:
    """Under torchrun, every process evaluates its share of each data set on its own
    device (data parallel) and rank 0 reports."""
    opts = from_args(EvalOptions, args)
    opts.data = tuple(opts.data)
    if opts.samples > 1 and opts.temperature == 0:
        raise ConfigError(f"--samples {opts.samples} at temperature 0 are copies of the greedy answer: sample with "
                          f"--temperature > 0 (e.g. 0.6)")
    keys_ = DataKeys(question=opts.question_key, answer=opts.answer_key, split=opts.split, category=opts.category_key)
    data = {spec: load_eval_examples(spec, opts.limit, keys_) for spec in opts.data}  # bad data fails before the model
    if "synthetic-long" in data and (opts.rollout != "hf" or opts.samples > 1 or opts.temperature > 0):
        raise ConfigError("--data synthetic-long scores the reference's likelihood with the HF model after greedy "
                          "reasoning: use --rollout hf, one greedy sample")
    for spec, examples in data.items():
        check_references(examples, f"--data {spec}")
    rank, world, device = distributed.setup("auto")
    try:
        return _evaluate_all(opts, data, rank, world, device)
    finally:
        distributed.teardown()


def _evaluate_all(opts: EvalOptions, data: dict[str, list[Example]], rank: int, world: int,
                  device: torch.device) -> int:
    tokenizer = load_tokenizer(opts.model)
    render = {spec: prompting(opts, spec) for spec in data}
    prompt_ids = {spec: prompt_renderer(tokenizer, **render[spec]) for spec in data}
    longest = max(len(prompt_ids[spec](ex)) for spec, examples in data.items() for ex in examples)
    started = time.perf_counter()
    names = [Path(spec).name for spec in data]  # a table row's name: the file's, its path where two share one
    rows = []
    with tempfile.TemporaryDirectory(prefix="pyvf-eval-") as cache_dir:
        engine, model = build_engine(opts, tokenizer, cache_dir, longest + opts.max_new_tokens, device)
        for spec, examples in data.items():
            if spec == "synthetic-long":  # not split between processes: every rank scores all of it
                short = dataset.load("synthetic", n_synthetic=len(examples), split="eval")
                result = evaluate_long(model, tokenizer, examples, short, max_new_tokens=opts.max_new_tokens,
                                       stop=stop_strings(opts.stop), **render[spec])
            else:
                result = evaluate_examples(engine, tokenizer, examples, samples=opts.samples,
                                           temperature=opts.temperature, max_new_tokens=opts.max_new_tokens,
                                           stop=stop_strings(opts.stop), answer_format=opts.answer_format,
                                           seed=opts.seed, render=prompt_ids[spec], progress=True, rank=rank,
                                           world=world,
                                           batch_size=opts.batch_size or (64 if opts.rollout == "hf"
                                                                          else len(examples)))
            rows.append((spec if names.count(Path(spec).name) > 1 else Path(spec).name, result))
        if hasattr(engine, "close"):
            engine.close()
    if rank != 0:
        return 0
    seconds = time.perf_counter() - started
    how = ("greedy" if opts.temperature == 0 else
           f"{opts.samples} sample(s) per question at temperature {opts.temperature:g}")
    print(f"eval: model {opts.model}, engine {opts.rollout}, {how}, {world} process(es), {seconds:.0f} s")
    print(format_results(rows))
    for name, result in rows:
        if "reference_loglik" in result:
            print(f"eval: {name}: reference log-likelihood {result['reference_loglik']:.3f} per token after the "
                  f"model's reasoning; accuracy is on the final number")
    checkpoint.write_atomic(opts.output, json.dumps(
        {"model": opts.model, "rollout": opts.rollout, "samples": opts.samples, "temperature": opts.temperature,
         "seed": opts.seed, "max_new_tokens": opts.max_new_tokens, "processes": world, "seconds": seconds,
         "results": [{"data": spec, **result} for spec, (_, result) in zip(data, rows)]}, indent=2))
    print(f"eval: wrote {opts.output}")
    return 0
