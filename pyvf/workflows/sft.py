"""Supervised fine-tuning on (question, completion) rows (`pyvf sft`): the rationales
`pyvf rationalize` keeps, or any JSONL file with `question` and `completion` fields.

Each row becomes one sequence: the prompt as training renders it (the task's prompt
template, through the tokenizer's chat template when it has one), then the completion's
tokens and an EOS. The loss is the mean negative log-likelihood of the completion and
EOS tokens only (the prompt is context, not a target), over every such token of the
batch. Batches are packed without padding and go through the same decoder forward and
lm_head op as RL training (`pyvf.runtime.policy.Policy`), so the full logits are never
materialized. AdamW, linear warm-up then cosine decay, gradient clipping at 1.0; the
order of rows is drawn from `seed`. The result is saved as a Hugging Face model
directory (weights + tokenizer) that `pyvf eval --model` and `pyvf train` read.

The plain baseline RAVR is compared with, SFT on the synthetic task's worked solutions
of the same questions, is `worked_solution_rows(questions)` (`pyvf sft --train-on
worked`).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pyvf.chat import render_prompt_ids, stop_token_ids
from pyvf.data import dataset, synthetic
from pyvf.data.dataset import SYNTHETIC_EVAL_SEED, SYNTHETIC_TRAIN_SEED
from pyvf.options import ConfigError, add_options, from_args, option
from pyvf.packing import IGNORE_INDEX, Sequence, pack
from pyvf.runtime.model import save_model
from pyvf.runtime.policy import Policy
from pyvf.workflows.common import PromptOptions, load_model, prompting
from pyvf.workflows.evaluate import evaluate


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a JSONL file that have a non-empty `question` and `completion`; a
    file with a bad line, or with no such row, is an error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    rows = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not a JSON object ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: not a JSON object")
            for key in ("question", "completion"):
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise ValueError(f"{path}:{n}: needs a non-empty string {key!r} (SFT trains on question -> "
                                     f"completion rows, e.g. the output of pyvf rationalize)")
            rows.append(row)
    if not rows:
        raise ValueError(f"data file {path} has no rows")
    return rows


def worked_solution_rows(questions: list[str], *, search: int = 50000) -> list[dict]:
    """The synthetic task's worked solutions (`Problem.completion`: reasoning, then the
    answer block) of `questions`, as SFT rows: the plain baseline of the same questions.
    Questions are looked up in the first `search` problems of the training split, then
    of the held-out split; a question of neither is an error naming it."""

    wanted = list(dict.fromkeys(questions))
    found: dict[str, object] = {}
    for seed in (SYNTHETIC_TRAIN_SEED, SYNTHETIC_EVAL_SEED):
        for problem in synthetic.generate(search, seed=seed):
            if problem.question in wanted and problem.question not in found:
                found[problem.question] = problem
        if len(found) == len(wanted):
            break
    missing = [q for q in wanted if q not in found]
    if missing:
        raise ValueError(f"questions: {len(missing)} question(s) are not questions of the synthetic task "
                         f"(first: {missing[0]!r}); worked solutions exist only for its questions")
    return [{"question": q, "answer": list(found[q].answers), "completion": found[q].completion} for q in questions]


def sft_sequence(tokenizer, question: str, completion: str, eos_id: int, *, prompt_template: str = "",
                 chat_template: str = "auto", system_prompt: str = "", assistant_prefix: str = "") -> Sequence:
    """One training sequence: the rendered prompt (not trained), the completion's tokens
    and the EOS (trained)."""

    prompt = render_prompt_ids(tokenizer, question, template=prompt_template, chat_template=chat_template,
                               system_prompt=system_prompt, assistant_prefix=assistant_prefix)
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    return Sequence(prompt, completion_ids + [eos_id], [], group=0)


def sft_loss(policy, sequences: list[Sequence]) -> tuple[torch.Tensor, int]:
    """(mean negative log-likelihood of the non-prompt tokens, their number) of a packed batch."""
    batch = pack(sequences)
    logprobs = policy(batch)
    n_tokens = int((batch.targets != IGNORE_INDEX).sum())
    return -logprobs.sum() / max(n_tokens, 1), n_tokens


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `steps` (step counts from 0)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def sft(model, tokenizer, rows: list[dict], *, steps: int = 200, lr: float = 1e-4, batch_size: int = 16,
        seed: int = 0, warmup: int | None = None, weight_decay: float = 0.0, max_seq_len: int = 512,
        prompt_template: str = "", chat_template: str = "auto", system_prompt: str = "",
        assistant_prefix: str = "", log_every: int = 20, log=None) -> list[float]:
    """Fine-tunes `model` in place on the rows' completions; returns the loss of every step.
    Sequences longer than `max_seq_len` are an error (they would be cut mid-answer)."""

    for name, value in (("steps", steps), ("batch_size", batch_size), ("max_seq_len", max_seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not rows:
        raise ValueError("rows must not be empty")
    warmup = max(1, steps // 20) if warmup is None else warmup
    eos = stop_token_ids(model, tokenizer)[0]
    render = dict(prompt_template=prompt_template, chat_template=chat_template, system_prompt=system_prompt,
                  assistant_prefix=assistant_prefix)
    sequences = [sft_sequence(tokenizer, row["question"], row["completion"], eos, **render) for row in rows]
    too_long = [i for i, s in enumerate(sequences) if len(s) > max_seq_len]
    if too_long:
        raise ValueError(f"rows: {len(too_long)} row(s) are longer than max_seq_len={max_seq_len} tokens "
                         f"(first: row {too_long[0]}, {len(sequences[too_long[0]])} tokens); raise max_seq_len")

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    policy = Policy(model, lm_head_pass="autograd")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup))
    order: list[int] = []
    losses = []
    start = time.time()
    model.train()
    for step in range(steps):
        if len(order) < batch_size:  # a new pass over the rows, in a fresh seeded order
            order += torch.randperm(len(sequences), generator=generator).tolist()
        chosen, order = order[:batch_size], order[batch_size:]
        loss, _ = sft_loss(policy, [sequences[i] for i in chosen])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log is not None and ((step + 1) % log_every == 0 or step + 1 == steps):
            log(f"sft: step {step + 1}/{steps} loss {losses[-1]:.4f} lr {schedule.get_last_lr()[0]:.2e} "
                f"({time.time() - start:.0f} s)")
    model.eval()
    return losses


HELP = "supervised fine-tuning on question/completion rows (e.g. pyvf rationalize's output)"
DESCRIPTION = ("Trains on the completion (and EOS) tokens of each row after its prompt, rendered as training "
               "renders it; saves a model directory for pyvf eval --model. --train-on worked trains on the "
               "synthetic task's worked solutions of the same questions instead (the plain SFT baseline).")


@dataclass
class SFTOptions(PromptOptions):
    model: str = option("builtin", "model directory to start from, a run, or builtin")
    data: str = option("", "JSONL file of rows with question and completion (required)")
    train_on: str = option("completion", "completion: the rows' completions; worked: the synthetic task's worked "
                           "solutions of the rows' questions", choices=("completion", "worked"))
    output_dir: str = option("runs/sft", "where the fine-tuned model directory is written")
    steps: int = option(200, "optimizer steps", minimum=1)
    lr: float = option(1e-4, "learning rate (linear warm-up, then cosine)")
    batch_size: int = option(16, "rows per step", minimum=1)
    seed: int = option(0, "seed of the row order")
    max_seq_len: int = option(512, "longest row trained on", minimum=1)
    eval_questions: int = option(0, "after training, greedy accuracy on this many held-out questions of "
                                 "--eval-data (written to OUTPUT_DIR/eval.json)", minimum=0)
    eval_data: str = option("synthetic", "the held-out data of --eval-questions")


def add_args(parser: argparse.ArgumentParser) -> None:
    add_options(parser, SFTOptions)


def main(args: argparse.Namespace) -> int:
    opts = from_args(SFTOptions, args)
    if not opts.data:
        raise ConfigError("--data: a JSONL file of rows with question and completion is required")
    rows = read_rows(opts.data)
    if opts.train_on == "worked":
        rows = worked_solution_rows([r["question"] for r in rows])
    model, tokenizer = load_model(opts.model)
    render = prompting(opts)
    print(f"sft: {len(rows)} rows ({'worked solutions of the questions of ' if opts.train_on == 'worked' else ''}"
          f"{opts.data}), {opts.steps} steps of {opts.batch_size}, lr {opts.lr:g}, seed {opts.seed}", flush=True)
    losses = sft(model, tokenizer, rows, steps=opts.steps, lr=opts.lr, batch_size=opts.batch_size, seed=opts.seed,
                 max_seq_len=opts.max_seq_len, log=lambda line: print(line, flush=True), **render)
    out = save_model(model, tokenizer, opts.output_dir)
    record = {"data": opts.data, "train_on": opts.train_on, "rows": len(rows), "steps": opts.steps, "lr": opts.lr,
              "batch_size": opts.batch_size, "seed": opts.seed, "model": opts.model, "first_loss": losses[0],
              "last_loss": losses[-1]}
    if opts.eval_questions:
        examples = dataset.load(opts.eval_data, n_synthetic=opts.eval_questions, split="eval")[:opts.eval_questions]
        result = evaluate(model, tokenizer, examples, max_new_tokens=64, **render)
        record["eval"] = {"data": opts.eval_data, "accuracy": result["accuracy"], "n": result["n"]}
        (out / "eval.json").write_text(json.dumps(result, indent=2))
        print(f"sft: held-out accuracy {100 * result['accuracy']:.1f}% ({result['correct']}/{result['n']}) "
              f"data {opts.eval_data}")
    (out / "sft.json").write_text(json.dumps(record, indent=2))
    print(f"sft: loss {losses[0]:.4f} -> {losses[-1]:.4f}; model -> {out}")
    return 0


__all__ = ["lr_factor", "read_rows", "save_model", "sft", "sft_loss", "sft_sequence", "worked_solution_rows"]
