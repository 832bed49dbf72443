"""Held-out evaluation with any rollout engine: k answers per question (greedy at
temperature 0, sampled above it), each graded by the answer it commits to
(`pyvf.data.answers.graded_answer`: math, choice or text), summarized as a paper
reports them: avg@k (mean accuracy over the k answers, the pass@1 estimate), pass@k
(a question counts when one of its k answers is right), and both per category when the
data has one. `pyvf eval` and `pyvf train --eval-data` both evaluate here.

Each question samples from its own seed (`prompt_seed(seed, 0, index)`), so the answers
do not depend on the batch size, the engine's batching or the number of processes."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from pyvf.chat import render_prompt_ids
from pyvf.data.answers import graded_answer, resolve_answer_format
from pyvf.data.example import Example
from pyvf.runtime import distributed
from pyvf.runtime.rollout.seeding import prompt_seed


def metric_names(samples: int) -> tuple[str, str]:
    """("avg@k", "pass@k") for k samples per question."""
    return f"avg@{samples}", f"pass@{samples}"


def summarize(details: list[dict], samples: int) -> dict:
    """avg@k and pass@k of per-question records (their "correct": one bool per answer)."""
    avg, pass_ = metric_names(samples)
    n = len(details)
    return {"n": n, avg: sum(sum(d["correct"]) / len(d["correct"]) for d in details) / n if n else 0.0,
            pass_: sum(any(d["correct"]) for d in details) / n if n else 0.0}


def prompt_renderer(tokenizer, *, prompt_template: str = "", chat_template: str = "auto", system_prompt: str = "",
                    assistant_prefix: str = "") -> Callable[[Example], list[int]]:
    """Example -> prompt token ids, rendered as training renders them (`render_prompt_ids`;
    a chat prompt's messages as given)."""
    def render(example: Example) -> list[int]:
        return render_prompt_ids(tokenizer, example.question, template=prompt_template, chat_template=chat_template,
                                 system_prompt=system_prompt, assistant_prefix=assistant_prefix,
                                 messages=example.messages)
    return render


def check_references(examples: list[Example], what: str = "examples") -> None:
    """Raises ValueError unless every example has a reference to grade against."""
    missing = next((i for i, ex in enumerate(examples) if not ex.answers), None)
    if missing is not None:
        raise ValueError(f"{what}: question {missing} has no reference answer, and evaluation grades answers "
                         f"against references (the open-ended task has none: its rubric rates them, pyvf bon)")


def evaluate_examples(engine, tokenizer, examples: list[Example], *, samples: int = 1, temperature: float = 0.0,
                      max_new_tokens: int = 64, stop: tuple[str, ...] | list[str] = ("</answer>",),
                      answer_format: str = "auto", seed: int = 0, batch_size: int = 64,
                      render: Callable[[Example], list[int]] | None = None, progress: bool = False, rank: int = 0,
                      world: int = 1) -> dict:
    """`samples` answers per example from `engine` (a `RolloutEngine`), graded. `render`
    makes an example's prompt ids (default: `prompt_renderer(tokenizer)`, the synthetic
    task's template). Under several processes (`world`), each evaluates a contiguous
    share in batches of `batch_size` prompts, every rank calling the engine equally often
    (a sharded HF engine decodes in step), and each gets the whole result.

    Returns {"answer_format", "samples", "temperature", "n", "avg@k", "pass@k",
    "accuracy" (= avg@k), "correct" (right answers), "categories": {name: {"n", "avg@k",
    "pass@k"}} (when the data has categories), "details": one record per question with
    its completions, the answers read from them and their grades}."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature!r}")
    if samples > 1 and temperature == 0:
        raise ValueError(f"samples={samples} at temperature 0 are {samples} copies of the greedy answer: sample at a "
                         f"temperature > 0 (e.g. --temperature 0.6)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not examples:
        raise ValueError("examples is empty: nothing to evaluate")
    check_references(examples)
    reported = resolve_answer_format(answer_format, examples)  # "auto" is decided per example in graded_answer
    render = render or prompt_renderer(tokenizer)
    share = -(-len(examples) // world)
    mine = range(rank * share, min(len(examples), (rank + 1) * share))
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc="eval", unit="question", dynamic_ncols=True)
    records = []
    for start in range(0, share, batch_size):
        batch = list(mine[start:start + batch_size])
        prompts = [render(examples[i]) for i in batch]
        groups = engine.generate(prompts, samples, max_new_tokens=max_new_tokens, temperature=temperature,
                                 seeds=[prompt_seed(seed, 0, i) for i in batch], stop=list(stop))
        for i, group in zip(batch, groups):
            ex = examples[i]
            texts = [tokenizer.decode(c.ids, skip_special_tokens=True) for c in group]
            graded = [graded_answer(t, ex.answers, answer_format, options=ex.options) for t in texts]
            records.append({"question": ex.question, "answers": list(ex.answers), "category": ex.category,
                            "predictions": [p for p, _ in graded], "correct": [c for _, c in graded],
                            "completions": texts, "completion_tokens": [len(c.ids) for c in group],
                            "finish": [c.finish for c in group]})
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    details = [r for part in distributed.all_gather_objects(records) for r in part] if world > 1 else records
    avg, _ = metric_names(samples)
    result = {"answer_format": reported, "samples": samples, "temperature": temperature, **summarize(details,
                                                                                                         samples)}
    result["accuracy"] = result[avg]
    result["correct"] = sum(sum(d["correct"]) for d in details)
    by_category = defaultdict(list)
    for d in details:
        if d["category"]:
            by_category[d["category"]].append(d)
    if by_category:
        result["categories"] = {name: summarize(rows, samples) for name, rows in sorted(by_category.items())}
    result["details"] = details
    return result


def format_results(rows: list[tuple[str, dict]]) -> str:
    """A markdown table of (name, result) rows, one per data set, then one table per data
    set with categories: what a paper's table shows."""
    if not rows:
        return ""
    samples = rows[0][1]["samples"]
    avg, pass_ = metric_names(samples)
    cols = [avg] if samples == 1 else [avg, pass_]
    lines = ["| data | format | questions | " + " | ".join(cols) + " |", "|---|---|---:|" + "---:|" * len(cols)]
    for name, r in rows:
        lines.append(f"| {name} | {r['answer_format']} | {r['n']} | "
                     + " | ".join(f"{100 * r[c]:.1f}" for c in cols) + " |")
    for name, r in rows:
        if r.get("categories"):
            lines += ["", f"{name} by category:", "", "| category | questions | " + " | ".join(cols) + " |",
                      "|---|---:|" + "---:|" * len(cols)]
            for category, c in r["categories"].items():
                lines.append(f"| {category} | {c['n']} | " + " | ".join(f"{100 * c[k]:.1f}" for k in cols) + " |")
    return "\n".join(lines)
