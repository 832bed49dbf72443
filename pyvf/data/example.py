"""One training or evaluation question and its equivalent reference answers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    question: str
    answers: tuple[str, ...]      # equivalent references, first is canonical (empty: no reference)
    weights: tuple[float, ...]    # one per answer, summing to 1
    # A prompt given as chat messages ((role, content), ...): rendered with the model's chat
    # template as given; `question` is then its last user turn.
    messages: tuple[tuple[str, str], ...] | None = None
    # A multiple-choice question's options, lettered A, B, ... in `question` (the reference is a letter).
    options: tuple[str, ...] = ()
    category: str = ""            # the data's category column (subject, data_source): evaluation's breakdown
