"""Best-of-N at inference ("verifier engineering", README: Reference-guided rationales and best-of-N; `pyvf bon`):
sample N completions, let a verifier pick one, and see how accuracy grows with N.

Each question is sampled max(N) times once (seeded per question, `prompt_seed(seed, 0,
index)`); for each N the first N of those samples are scored by the verifier, as one
group (a verifier such as `majority` looks at the group), and the highest-scoring
one is the answer (ties and NaN "no opinion" scores: the first of the best). Its
correctness is the rule check of its last \\boxed{} against the references; for a task
without references (the open-ended story task) the true rating
(`pyvf.data.openended.true_score`) takes its place and the accuracy column is the mean
true score. `oracle` is what a perfect verifier would get from the same samples: the
share of questions with a correct sample among the first N (the best true score).

A verifier that knows nothing (random scores) leaves the accuracy at that of one
sample for every N; a useful one makes it rise toward the oracle.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyvf.chat import render_prompt_ids, stop_token_ids
from pyvf.data import dataset
from pyvf.data.answers import is_equivalent, last_boxed
from pyvf.data.openended import true_score
from pyvf.options import add_options, from_args, option
from pyvf.runtime.checkpoint import write_atomic
from pyvf.runtime.rollout import HFGenerate, prompt_seed
from pyvf.verify import get_verifier
from pyvf.workflows.common import SamplingOptions, load_model, prompting, stop_strings, task_defaults


def parse_ns(text: str) -> list[int]:
    """"1,2,4,8" -> [1, 2, 4, 8]: positive, strictly increasing integers."""
    try:
        ns = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--n must be comma-separated positive integers, got {text!r}") from None
    if not ns or min(ns) < 1 or any(b <= a for a, b in zip(ns, ns[1:])):
        raise ValueError(f"--n must be positive integers in increasing order, got {text!r}")
    return ns


def pick_best(scores: list[float]) -> int:
    """Index of the highest score; ties go to the first, NaN never wins unless all are NaN."""
    best, best_score = 0, -math.inf
    for i, s in enumerate(scores):
        s = float(s)
        if not math.isnan(s) and s > best_score:
            best, best_score = i, s
    return best


def rule_correctness(completion: str, references, *, backend: str = "auto") -> float:
    """1.0 when the completion's last \\boxed{} matches a reference (`backend` as in
    pyvf.data.answers); with no references, the open-ended task's true score of the
    completion."""
    if references:
        return float(is_equivalent(last_boxed(completion), list(references), backend=backend))

    return float(true_score(completion))


def best_of_n_curve(prompts: list[str], completions: list[list[str]], references, ns: list[int], verifier, *,
                    correctness: Callable[[str, object], float] = rule_correctness) -> list[dict]:
    """For each N of `ns`: the mean correctness of the completion the verifier picks
    among the first N of each question (`accuracy`), of the first sample (`first`) and
    of the best one (`oracle`). prompts[i] is question i's prompt text, completions[i]
    its samples (at least max(ns)), references[i] its references (None or [] for
    none; `references` itself may be None)."""
    if len(prompts) != len(completions):
        raise ValueError(f"prompts and completions must have one entry per question, got {len(prompts)} "
                         f"and {len(completions)}")
    if references is None:
        references = [None] * len(prompts)
    if len(references) != len(prompts):
        raise ValueError(f"references must have one entry per question ({len(prompts)}), got {len(references)}")
    short = [i for i, c in enumerate(completions) if len(c) < max(ns)]
    if short:
        raise ValueError(f"completions[{short[0]}] holds {len(completions[short[0]])} samples, fewer than "
                         f"max(ns)={max(ns)}")
    if not prompts:
        raise ValueError("prompts must not be empty")
    correct = [[correctness(c, refs) for c in comps[:max(ns)]] for comps, refs in zip(completions, references)]
    has_refs = all(refs for refs in references)
    curve = []
    for n in ns:
        flat_prompts = [p for p in prompts for _ in range(n)]
        flat_completions = [c for comps in completions for c in comps[:n]]
        flat_refs = [list(refs) for refs in references for _ in range(n)] if has_refs else None
        scores = list(verifier(flat_prompts, flat_completions, flat_refs))
        if len(scores) != len(flat_completions):
            raise ValueError(f"verifier {getattr(verifier, 'name', verifier)!r} returned {len(scores)} scores for "
                             f"{len(flat_completions)} completions")
        picked = [pick_best(scores[i * n:(i + 1) * n]) for i in range(len(prompts))]
        accuracy = sum(correct[i][k] for i, k in enumerate(picked)) / len(prompts)
        oracle = sum(max(row[:n]) for row in correct) / len(prompts)
        curve.append({"n": n, "accuracy": accuracy, "oracle": oracle,
                      "first": sum(row[0] for row in correct) / len(prompts)})
    return curve


def sample_completions(model, tokenizer, examples, n: int, *, seed: int = 0, max_new_tokens: int = 64,
                       temperature: float = 1.0, prompt_template: str = "", chat_template: str = "auto",
                       system_prompt: str = "", assistant_prefix: str = "", stop=("</answer>",),
                       batch_size: int = 16, progress=None) -> tuple[list[str], list[list[str]]]:
    """(prompt text, n completion texts) of each example: prompts rendered as in training,
    sampled with HFGenerate, seeded per question."""

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    engine = HFGenerate(model, tokenizer, stop_token_ids=stop_token_ids(model, tokenizer))
    prompt_ids = [render_prompt_ids(tokenizer, ex.question, template=prompt_template, chat_template=chat_template,
                                    system_prompt=system_prompt, assistant_prefix=assistant_prefix,
                                    messages=ex.messages)
                  for ex in examples]
    completions: list[list[str]] = []
    for start in range(0, len(examples), batch_size):
        chunk = prompt_ids[start:start + batch_size]
        seeds = [prompt_seed(seed, 0, start + j) for j in range(len(chunk))]
        outputs = engine.generate(chunk, n, max_new_tokens=max_new_tokens, temperature=temperature, seeds=seeds,
                                  stop=list(stop))
        completions += [[tokenizer.decode(c.ids, skip_special_tokens=True) for c in outs] for outs in outputs]
        if progress is not None:
            progress(len(completions), len(examples))
    prompts = [tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
               for ids in prompt_ids]
    return prompts, completions


def format_table(result: dict) -> str:
    metric = "accuracy" if result.get("has_references", True) else "mean true score"
    lines = [f"best-of-N, verifier {result['verifier']}, {result['questions']} questions ({metric})",
             f"{'N':>5}  {'picked':>8}  {'oracle':>8}"]
    for row in result["curve"]:
        lines.append(f"{row['n']:>5}  {100 * row['accuracy']:>7.1f}%  {100 * row['oracle']:>7.1f}%")
    return "\n".join(lines)


def plot_curve(result: dict, path: str | Path) -> Path | None:
    """Accuracy of the picked completion and the oracle vs N (log2 x axis) as a PNG;
    None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bon: matplotlib not installed, no plot", file=sys.stderr)
        return None
    ns = [row["n"] for row in result["curve"]]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(ns, [row["accuracy"] for row in result["curve"]], marker="o", lw=1.4,
            label=f"picked by {result['verifier']}")
    ax.plot(ns, [row["oracle"] for row in result["curve"]], marker=".", lw=1.0, ls="--", color="gray",
            label="oracle (best of the N)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.set_xlabel("N (samples per question)")
    ax.set_ylabel("accuracy" if result.get("has_references", True) else "mean true score")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"best-of-N: {result['model']} on {result['data']} ({result['questions']} questions)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_result(result: dict, output_dir: str | Path) -> tuple[Path, Path | None]:
    """bon.json (the result) and bon.png (the curve) in `output_dir`."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = write_atomic(out / "bon.json", json.dumps(result, indent=2))
    return json_path, plot_curve(result, out / "bon.png")


HELP = "best-of-N: accuracy as N grows when a verifier picks one of N samples"
DESCRIPTION = ("Samples max(N) completions per question once, lets the verifier pick one of the first N for "
               "each N, prints a table and writes OUTPUT_DIR/bon.json and bon.png.")


@dataclass
class BonOptions(SamplingOptions):
    model: str = option("builtin", "model directory, a run, or builtin")
    data: str = option("synthetic", "JSONL file, synthetic or openended (held-out split)")
    n: str = option("1,2,4,8,16", "comma-separated N, increasing")
    verifier: str = option("majority", "a pyvf.verify spec: rule, majority, self_rubric, verifree, python:mod:fn, "
                           "or a weighted sum such as 'majority + 0.5*verifree'")
    rubric: str | None = option(None, "for self_rubric: a rubric YAML or built-in name (with --data openended: "
                                "story)")
    limit: int = option(100, "number of held-out questions", minimum=1)
    output_dir: str = option("runs/bon", "where bon.json and bon.png go")
    stop: str | None = option(None, "stop strings, | separated (none: </answer>; </rating> for openended)")


def add_args(parser: argparse.ArgumentParser) -> None:
    add_options(parser, BonOptions)


def main(args: argparse.Namespace) -> int:
    opts = from_args(BonOptions, args)
    ns = parse_ns(opts.n)
    examples = dataset.load(opts.data, n_synthetic=opts.limit, split="eval")[:opts.limit]
    model, tokenizer = load_model(opts.model)
    context = dict(model=model, tokenizer=tokenizer, max_seq_len=opts.max_seq_len)
    rubric = opts.rubric or ("story" if opts.data == "openended" else None)
    if rubric is not None:
        context["rubric"] = rubric
    verifier = get_verifier(opts.verifier, **context)
    stop = opts.stop if opts.stop is not None else task_defaults(opts.data)[1]
    print(f"bon: {len(examples)} questions x {max(ns)} samples, verifier {opts.verifier}, model {opts.model}",
          flush=True)
    prompts, completions = sample_completions(
        model, tokenizer, examples, max(ns), seed=opts.seed, max_new_tokens=opts.max_new_tokens,
        temperature=opts.temperature, stop=stop_strings(stop), batch_size=opts.batch_size,
        progress=lambda done, total: print(f"bon: sampled {done}/{total} questions", file=sys.stderr, flush=True),
        **prompting(opts, opts.data))
    has_refs = all(ex.answers for ex in examples)
    curve = best_of_n_curve(prompts, completions, [list(ex.answers) for ex in examples], ns, verifier)
    result = {"model": opts.model, "data": opts.data, "verifier": opts.verifier, "questions": len(examples),
              "seed": opts.seed, "temperature": opts.temperature, "has_references": has_refs, "curve": curve,
              "verifier_stats": dict(getattr(verifier, "stats", {}) or {})}
    json_path, png = write_result(result, opts.output_dir)
    print(format_table(result))
    print(f"bon: wrote {json_path}" + (f" and {png}" if png else ""))
    return 0


__all__ = ["best_of_n_curve", "format_table", "parse_ns", "pick_best", "plot_curve", "rule_correctness",
           "sample_completions", "task_defaults", "write_result"]
