"""Training and evaluation data: the built-in tasks, or a file of question/answer rows
(JSONL, JSON, Parquet, CSV, `datasets` directories: pyvf.data.files)."""

from __future__ import annotations

import random

from pyvf.data import openended, synthetic
from pyvf.data.answers import normalize
from pyvf.data.example import Example
from pyvf.data.files import DataKeys, load_examples, with_options


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


def synthetic_choice_examples(n: int, seed: int) -> list[Example]:
    """The synthetic questions as multiple choice, the way benchmarks such as MMLU-Pro
    ask: four options (the answer, the answer of the solution that skips a step, and
    near misses) in an order drawn from `seed`, the letter as the reference, the kind of
    question as the category."""
    rng = random.Random(seed)
    examples = []
    for p in synthetic.generate(n, seed=seed):
        options = [p.answers[0]]
        for wrong in (p.shortcut_answer, *(synthetic.answer_forms(p.answer + d)[0] for d in (1, -1, 2, 3, -2))):
            if len(options) < 4 and wrong and normalize(wrong) not in {normalize(o) for o in options}:
                options.append(wrong)
        rng.shuffle(options)
        letter = "ABCD"[options.index(p.answers[0])]
        examples.append(Example(with_options(p.question, options), (letter,), (1.0,), options=tuple(options),
                                category=p.template))
    return examples


SYNTHETIC_TASKS = {"synthetic": synthetic_examples, "synthetic-long": synthetic_long_examples,
                   "synthetic-choice": synthetic_choice_examples}


def load(spec: str, *, n_synthetic: int = 5000, split: str = "train", keys: DataKeys | None = None) -> list[Example]:
    """`spec` is "synthetic" (the built-in arithmetic task), "synthetic-long" (the same
    questions, the worked solution as the reference), "synthetic-choice" (the same
    questions as multiple choice), "openended" (the built-in story task, no reference
    answers: pyvf.data.openended), or a JSONL, JSON, Parquet or CSV file or a `datasets`
    directory (pyvf.data.files; `keys` names its columns)."""
    if spec in SYNTHETIC_TASKS:
        seed = SYNTHETIC_TRAIN_SEED if split == "train" else SYNTHETIC_EVAL_SEED
        return SYNTHETIC_TASKS[spec](n_synthetic, seed)
    if spec == "openended":
        return openended.examples(n_synthetic, openended.TRAIN_SEED if split == "train" else openended.EVAL_SEED)
    return load_examples(spec, keys)
