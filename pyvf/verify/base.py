"""The interface every verifier implements, and the input checks they share.

A verifier scores a batch of completions:

    scores = verifier(prompts, completions, references)   # list[float], one per completion

`prompts[i]` is the prompt text completion i answered (a group of G samples repeats
its prompt G times), `completions[i]` the completion text, and `references[i]` the
list of equivalent reference answers of its example (None for a task without them).
Scores are plain floats; higher is better. A verifier may return NaN for "no opinion"
(a user function that returns None for a sample, as TRL allows); `Weighted` and
`pyvf.ops.grouped_advantages` leave NaN out.

Each verifier has a `name` (used in logs and to name combinations) and a `stats`
dict of running counts since it was made or since `reset_stats()`: the completions it
scored and how many of them it could not read (no answer, an unparsable rating, no
answer marker). The trainer can log them per step by resetting after each read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from pyvf.data.answers import BACKENDS


@runtime_checkable
class Verifier(Protocol):
    """Anything with a `name` that maps (prompts, completions, references) to scores.
    `stats` is optional for users' own verifiers; the built-ins all have it."""

    name: str

    def __call__(self, prompts: list[str], completions: list[str],
                 references: list[list[str]] | None = None) -> list[float]:
        ...


class BaseVerifier:
    """Shared plumbing of the built-in verifiers: the running `stats` counts."""

    name: str = ""

    def __init__(self) -> None:
        self.stats: dict[str, float] = {}

    def count(self, key: str, n: float = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def reset_stats(self) -> None:
        self.stats.clear()

    def __repr__(self) -> str:
        return f"<verifier {self.name}>"


class AnswerVerifier(BaseVerifier):
    """A verifier that compares final \\boxed{} answers, by `backend` as in
    pyvf.data.answers ("auto": math-verify when installed, pyvf's normalizer otherwise)."""

    def __init__(self, *, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend


def check_batch(prompts, completions, references, *, need_references: bool = False, who: str = "verifier"
                ) -> tuple[list[str], list[str], list[list[str]] | None]:
    """The batch as lists, after checking that the three line up and hold strings.
    `references[i]` may be one string (taken as a list of one). With `need_references`
    every row must have at least one non-empty reference."""
    prompts = _strings("prompts", prompts)
    completions = _strings("completions", completions)
    if len(prompts) != len(completions):
        raise ValueError(f"prompts and completions must have the same length, got {len(prompts)} "
                         f"and {len(completions)}")
    if references is None:
        if need_references:
            raise ValueError(f"references: the {who} verifier scores against reference answers, got None")
        return prompts, completions, None
    if isinstance(references, (str, bytes)) or not isinstance(references, Sequence):
        raise ValueError(f"references must be a list with one list of reference strings per completion, "
                         f"got {type(references).__name__}")
    if len(references) != len(completions):
        raise ValueError(f"references must have one entry per completion ({len(completions)}), "
                         f"got {len(references)}")
    rows = []
    for i, refs in enumerate(references):
        if isinstance(refs, str):
            refs = [refs]
        if not isinstance(refs, Sequence) or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references[{i}] must be a list of strings, got {refs!r}")
        if need_references and not any(r.strip() for r in refs):
            raise ValueError(f"references[{i}] is empty: the {who} verifier needs a reference answer for "
                             f"every completion")
        rows.append(list(refs))
    return prompts, completions, rows


def _strings(name: str, values) -> list[str]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a list of strings, got {type(values).__name__}")
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise ValueError(f"{name}[{i}] must be a string, got {type(v).__name__}")
    return list(values)


__all__ = ["AnswerVerifier", "BaseVerifier", "Verifier", "check_batch"]
