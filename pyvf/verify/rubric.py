"""`self_rubric`: the self-rated rubric reward (docs/algorithms.md: Self-rated rubric, "reverse incentive").

The model writes its answer, then rates that answer against a rubric's explicit
criteria; the rating is the reward. The rubric's YAML format and the rating block are
in `pyvf.data.rubric`; a completion whose block is missing or malformed scores 0, and
the verifier counts why.

Without a rater, the rating is read from the completion itself (answer + rating). With
`rate` (a callable that maps rating prompts to generated texts: a frozen or slow copy
of the policy, another model), the completion's own rating block is cut off, the rater
sees the prompt and the answer, and its output is parsed instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pyvf.chat import stop_token_ids
from pyvf.data.rubric import (
    CLOSE, OPEN, Criterion, Rubric, load_rubric, parse_rating, read_ratings, read_ratings_why, rubric_from_dict,
)
from pyvf.runtime.rollout import greedy
from pyvf.verify.base import BaseVerifier, check_batch


def answer_part(completion: str) -> str:
    """The completion without its own rating: everything before the first `<rating>`."""
    pos = completion.find(OPEN)
    return completion if pos < 0 else completion[:pos].rstrip()


def default_rating_prompt(prompt: str, answer: str) -> str:
    """What the rater continues: the prompt and the answer as the policy wrote it, then a
    new line, the very context in which the policy rates itself (so a copy of the policy
    can rate). Pass `rating_prompt=` to give another rater the rubric's instructions."""
    return f"{prompt}{answer}\n"


class SelfRubric(BaseVerifier):
    """stats: `scored`, `unparsable` (scored 0) and, per kind of failure, `why/<kind>`
    (no_block, several_blocks, malformed, unknown, duplicate, out_of_range, missing);
    `last_reasons` holds the reason per completion of the last call ("" where the rating
    was read)."""

    name = "self_rubric"

    def __init__(self, rubric: str | Path | Rubric, *, rate: Callable[[list[str]], list[str]] | None = None,
                 rating_prompt: Callable[[str, str], str] = default_rating_prompt):
        super().__init__()
        self.rubric = load_rubric(rubric)
        if rate is not None and not callable(rate):
            raise ValueError(f"rate must be a callable (rating prompts -> texts), got {type(rate).__name__}")
        if not callable(rating_prompt):
            raise ValueError(f"rating_prompt must be a callable (prompt, answer) -> text, got "
                             f"{type(rating_prompt).__name__}")
        self.rate = rate
        self.rating_prompt = rating_prompt
        self.last_reasons: list[str] = []

    def __call__(self, prompts, completions, references=None) -> list[float]:
        prompts, completions, _ = check_batch(prompts, completions, references, who=self.name)
        if self.rate is None:
            texts = completions
        else:
            asks = [self.rating_prompt(p, answer_part(c)) for p, c in zip(prompts, completions)]
            texts = self.rate(asks)
            if hasattr(texts, "tolist"):
                texts = texts.tolist()
            if not isinstance(texts, (list, tuple)) or len(texts) != len(asks) or not all(
                    isinstance(t, str) for t in texts):
                raise ValueError(f"rate must return one string per rating prompt ({len(asks)}), got "
                                 f"{type(texts).__name__} of {len(texts) if hasattr(texts, '__len__') else '?'}")
        scores, reasons = [], []
        for text in texts:
            ratings, kind, why = read_ratings_why(text, self.rubric)
            reasons.append(why)
            if ratings is None:
                self.count("unparsable")
                self.count(f"why/{kind}")
            scores.append(0.0 if ratings is None else self.rubric.score(ratings))
        self.last_reasons = reasons
        self.count("scored", len(scores))
        return scores


def model_rater(model, tokenizer, *, max_new_tokens: int = 64,
                batch_size: int = 32) -> Callable[[list[str]], list[str]]:
    """A `rate` callable from a causal LM: greedy continuation of each rating prompt,
    stopping after `</rating>` (a frozen copy of the policy, or another model)."""
    def rate(asks: list[str]) -> list[str]:
        ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in asks]
        out = greedy(model, tokenizer, ids, max_new_tokens, batch_size=batch_size, stop=[CLOSE],
                     stop_token_ids=stop_token_ids(model, tokenizer))
        return [tokenizer.decode(o, skip_special_tokens=True) for o in out]

    return rate


__all__ = ["CLOSE", "Criterion", "OPEN", "Rubric", "SelfRubric", "answer_part", "default_rating_prompt",
           "load_rubric", "model_rater", "parse_rating", "read_ratings", "rubric_from_dict"]
