"""Training and evaluation data: JSONL rows with `question` and `answer` (a string or a
list of equivalent answers) and optional `weights`, or the built-in synthetic task."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pyvf.data import openended, synthetic
from pyvf.data.example import Example

log = logging.getLogger("pyvf")


def _row_to_example(row) -> Example | None:
    if not isinstance(row, dict):
        return None
    q, a = row.get("question"), row.get("answer")
    if not isinstance(q, str) or not q.strip():
        return None
    answers = [a] if isinstance(a, str) else a
    if not isinstance(answers, list) or not answers or not all(isinstance(x, str) and x.strip() for x in answers):
        return None
    w = row.get("weights")
    if w is None:
        w = [1.0] * len(answers)
    if (not isinstance(w, list) or len(w) != len(answers)
            or not all(isinstance(x, (int, float)) and x >= 0 for x in w) or sum(w) <= 0):
        return None
    total = float(sum(w))
    return Example(q.strip(), tuple(x.strip() for x in answers), tuple(float(x) / total for x in w))


def load_jsonl(path: str | Path) -> list[Example]:
    """Rows with missing or empty fields are skipped and counted in the log; a file left
    with no usable row is an error."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    examples, bad = [], 0
    with path.open() as f:
        for line in f:
            if not line.strip():
                continue
            try:
                ex = _row_to_example(json.loads(line))
            except json.JSONDecodeError:
                ex = None
            if ex is None:
                bad += 1
            else:
                examples.append(ex)
    if bad:
        log.warning("data: skipped %d bad row(s) of %s (missing or empty question/answer, bad weights)", bad, path)
    if not examples:
        raise ValueError(f"dataset {path} is empty: no row has a non-empty question and answer")
    return examples


def synthetic_examples(n: int, seed: int) -> list[Example]:
    return [Example(p.question, p.answers, tuple(1.0 / len(p.answers) for _ in p.answers))
            for p in synthetic.generate(n, seed=seed)]


# The synthetic task's fixed splits: training questions and held-out questions come
# from different seeds.
SYNTHETIC_TRAIN_SEED = 1
SYNTHETIC_EVAL_SEED = 2


def synthetic_long_examples(n: int, seed: int) -> list[Example]:
    """The synthetic questions with their whole worked solution as the one reference
    (tens of tokens, ending with the final number: `long_reference`), a long-form answer
    whose probability vanishes next to a number's."""
    return [Example(p.question, (long_reference(p),), (1.0,)) for p in synthetic.generate(n, seed=seed)]


def long_reference(problem: "synthetic.Problem") -> str:
    return f"{problem.solution} The answer is {problem.answers[0]}."


def load(spec: str, *, n_synthetic: int = 5000, split: str = "train") -> list[Example]:
    """`spec` is "synthetic" (the built-in arithmetic task), "synthetic-long" (the same
    questions, the worked solution as the reference), "openended" (the built-in story
    task, no reference answers: pyvf.data.openended) or a path to a JSONL file."""
    if spec in ("synthetic", "synthetic-long"):
        seed = SYNTHETIC_TRAIN_SEED if split == "train" else SYNTHETIC_EVAL_SEED
        return (synthetic_examples if spec == "synthetic" else synthetic_long_examples)(n_synthetic, seed)
    if spec == "openended":
        return openended.examples(n_synthetic, openended.TRAIN_SEED if split == "train" else openended.EVAL_SEED)
    return load_jsonl(spec)
