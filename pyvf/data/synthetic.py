"""The built-in synthetic task: multi-step arithmetic word problems whose answers have
equivalent forms (8/5 and 1.6), so that verifier-free rewards with several references
(docs/algorithms.md) have something to do. Used by the tokenizer build, the demo and the tests.

Every problem is generated from a seed, so a split is reproducible:

    >>> p = generate(1, seed=0)[0]
    >>> p.question, p.answers, p.solution
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction

# How a completion ends: the reasoning, then the answer in the VeriFree template.
ANSWER_TEMPLATE = "<answer> \\boxed{{{ref}}} </answer>"
PROMPT_TEMPLATE = "Question: {question}\nGive the final answer as <answer> \\boxed{{...}} </answer>.\nReasoning:"
# Post-completion learning (pyvf/objectives/pcl.py): the same question, and after the
# answer a self-evaluation and the predicted [accuracy, format] reward.
PCL_PROMPT_TEMPLATE = ("Question: {question}\nGive the final answer as <answer> \\boxed{{...}} </answer>, then "
                       "<evaluation> ... </evaluation> <reward> [accuracy, format] </reward>.\nReasoning:")
# R-Zero's challenger (pyvf/objectives/rzero.py): write a new question of the task.
QUESTION_PROMPT = "Write a new question for the task.\nNew question:"
QUESTION_TEMPLATE = " <question> {question} </question>"
# Reference-guided rationales (RAVR, arXiv 2510.25206; `pyvf rationalize`): the question
# and its reference in view, a derivation that must not reveal it saw the reference.
RATIONALIZE_TEMPLATE = ("Question: {question}\nReference answer: {reference}\nGiven the question and reference "
                        "answer, produce a step-by-step explanation in first-person think-aloud style. You must not "
                        "mention prior access to the reference answer. Include intermediate steps, rationale, and "
                        "any necessary backtracking.\nReasoning:")

NAMES = ["Ada", "Ben", "Chen", "Dana", "Eli", "Fatima", "Goro", "Hana", "Ivan", "Jun", "Kofi", "Lena", "Mira",
          "Noor", "Omar", "Pia", "Quinn", "Rosa", "Sami", "Tara"]
ITEMS = ["apples", "pencils", "marbles", "cookies", "stickers", "books", "coins", "shells", "cards", "stones"]
_LIQUIDS = ["water", "juice", "milk", "tea", "paint", "oil"]


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str           # the worked reasoning, ending before the answer
    answer: Fraction
    answers: tuple[str, ...]  # equivalent written forms, canonical first
    shortcut: str = ""      # a plausible but wrong worked solution that skips a step
    shortcut_answer: str = ""
    template: str = ""      # which kind of question: share, give_away, packs, pour or rate

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATE.format(question=self.question)

    @property
    def completion(self) -> str:
        """The reference completion: reasoning, then the answer (canonical form)."""
        return f" {self.solution} " + ANSWER_TEMPLATE.format(ref=self.answers[0])

    @property
    def shortcut_completion(self) -> str:
        """A completion that skips a step and so ends at a wrong answer."""
        return f" {self.shortcut} " + ANSWER_TEMPLATE.format(ref=self.shortcut_answer)


def answer_forms(x: Fraction) -> tuple[str, ...]:
    """'7'; '8/5' and '1.6'; '1/3' alone: a decimal form only when it terminates."""
    if x.denominator == 1:
        return (str(x.numerator),)
    forms = [f"{x.numerator}/{x.denominator}"]
    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d == 1:
        forms.append(_decimal(x))
    return tuple(forms)


def _decimal(x: Fraction) -> str:
    sign = "-" if x < 0 else ""
    x = abs(x)
    whole, rest = divmod(x.numerator, x.denominator)
    digits = ""
    while rest:
        rest *= 10
        digit, rest = divmod(rest, x.denominator)
        digits += str(digit)
    return f"{sign}{whole}.{digits}" if digits else f"{sign}{whole}"


def _fmt(x: Fraction) -> str:
    return answer_forms(x)[0]


def _share(rng: random.Random) -> tuple[str, str, Fraction, str, Fraction]:
    name, items = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(2, 30), rng.randint(1, 20), rng.randint(2, 9)
    total = Fraction(a + b)
    ans = total / c
    q = (f"{name} has {a} {items} and buys {b} more, then shares them equally among {c} friends. "
         f"How many {items} does each friend get?")
    s = f"{a} + {b} = {a + b}. {a + b} / {c} = {_fmt(ans)}."
    wrong = Fraction(a, c)
    return q, s, ans, f"{a} / {c} = {_fmt(wrong)}.", wrong


def _give_away(rng: random.Random) -> tuple[str, str, Fraction, str, Fraction]:
    name, items = rng.choice(NAMES), rng.choice(ITEMS)
    c = rng.randint(2, 8)
    b = rng.randint(1, 15)
    a = b + rng.randint(1, 40)
    ans = Fraction(a - b, c)
    q = (f"{name} has {a} {items}, gives away {b}, and packs the rest equally into {c} boxes. "
         f"How many {items} go in each box?")
    s = f"{a} - {b} = {a - b}. {a - b} / {c} = {_fmt(ans)}."
    wrong = Fraction(a, c)
    return q, s, ans, f"{a} / {c} = {_fmt(wrong)}.", wrong


def _packs(rng: random.Random) -> tuple[str, str, Fraction, str, Fraction]:
    name, items = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(2, 9), rng.randint(2, 12), rng.randint(2, 10)
    ans = Fraction(a * b, c)
    q = (f"{name} buys {a} packs of {b} {items} and splits them equally among {c} children. "
         f"How many {items} does each child get?")
    s = f"{a} * {b} = {a * b}. {a * b} / {c} = {_fmt(ans)}."
    wrong = Fraction(b, c)
    return q, s, ans, f"{b} / {c} = {_fmt(wrong)}.", wrong


def _pour(rng: random.Random) -> tuple[str, str, Fraction, str, Fraction]:
    liquid = rng.choice(_LIQUIDS)
    a, b, c, d = rng.randint(2, 20), rng.randint(2, 20), rng.randint(1, 10), rng.randint(2, 8)
    c = min(c, a + b - 1)
    ans = Fraction(a + b - c, d)
    q = (f"A jug holds {a} liters of {liquid} and {b} more liters are added. {c} liters spill, and the rest "
         f"is poured equally into {d} bottles. How many liters are in each bottle?")
    s = f"{a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}. {a + b - c} / {d} = {_fmt(ans)}."
    wrong = Fraction(a + b, d)
    return q, s, ans, f"{a} + {b} = {a + b}. {a + b} / {d} = {_fmt(wrong)}.", wrong


def _rate(rng: random.Random) -> tuple[str, str, Fraction, str, Fraction]:
    name = rng.choice(NAMES)
    a, b, c = rng.randint(2, 12), rng.randint(2, 9), rng.randint(2, 10)
    ans = Fraction(a * b, c)
    q = (f"{name} walks {a} km every hour for {b} hours, and the path has {c} equal parts. "
         f"How many km long is each part?")
    s = f"{a} * {b} = {a * b}. {a * b} / {c} = {_fmt(ans)}."
    wrong = Fraction(a, c)
    return q, s, ans, f"{a} / {c} = {_fmt(wrong)}.", wrong


_TEMPLATES = [_share, _give_away, _packs, _pour, _rate]


def generate(n: int, seed: int = 0) -> list[Problem]:
    """n problems, reproducible from `seed`."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        template = rng.choice(_TEMPLATES)
        q, s, ans, shortcut, wrong = template(rng)
        problems.append(Problem(question=q, solution=s, answer=ans, answers=answer_forms(ans), shortcut=shortcut,
                                shortcut_answer=_fmt(wrong), template=template.__name__.lstrip("_")))
    return problems
