"""`majority`: agreement with the group's majority answer (self-consistency; R-Zero's
pseudo-label, docs/algorithms.md: R-Zero). No reference is used.

Completions are grouped by identical prompt text. Each completion's answer is its last
\\boxed{...}; answers fall into equivalence classes in order of appearance: an answer
joins the first class whose first answer it is equivalent to, either way round
(pyvf.data.answers, so 8/5 and 1.6 vote together), else it opens a new class. The
majority class is the largest; a tie goes to the class whose first answer came first in
the batch. A completion scores 1.0 when its answer is in the majority class, else 0.0.
A completion without a \\boxed{} answer scores 0 and does not vote. A prompt with a
single answering completion makes that answer the majority (score 1).
(pyvf.objectives.rzero.majority_vote differs on purpose: as R-Zero's official code, it
lets missing answers vote, as a class of their own.)
"""

from __future__ import annotations

from pyvf.data.answers import equivalent_pair, last_boxed
from pyvf.verify.base import AnswerVerifier, check_batch


def answer_classes(answers: list[str | None], *, backend: str = "auto") -> list[int | None]:
    """Class index of each answer (None for a missing answer); classes are numbered in
    order of first appearance and each is represented by its first answer."""
    representatives: list[str] = []
    out: list[int | None] = []
    for answer in answers:
        if answer is None:
            out.append(None)
            continue
        for k, rep in enumerate(representatives):
            # math-verify's check is not symmetric (gold vs prediction): either way counts.
            if equivalent_pair(answer, rep, backend=backend) or equivalent_pair(rep, answer, backend=backend):
                out.append(k)
                break
        else:
            representatives.append(answer)
            out.append(len(representatives) - 1)
    return out


def majority_vote(answers: list[str | None], *, backend: str = "auto") -> tuple[int | None, float]:
    """(index into `answers` of the majority answer's first occurrence, its share of the
    votes), or (None, 0.0) when no answer votes. Ties go to the class seen first."""
    classes = answer_classes(answers, backend=backend)
    best, share = _majority_class(classes)
    return (None, 0.0) if best is None else (classes.index(best), share)


def _majority_class(classes: list[int | None]) -> tuple[int | None, float]:
    votes: dict[int, int] = {}
    for c in classes:
        if c is not None:
            votes[c] = votes.get(c, 0) + 1
    if not votes:
        return None, 0.0
    # Classes are numbered by first appearance, so the smallest index wins a tie.
    best = min(votes, key=lambda c: (-votes[c], c))
    return best, votes[best] / sum(votes.values())


class MajorityVerifier(AnswerVerifier):
    """stats: `scored`, `no_answer`, `groups` (distinct prompts seen)."""

    name = "majority"

    def __call__(self, prompts, completions, references=None) -> list[float]:
        prompts, completions, _ = check_batch(prompts, completions, references, who=self.name)
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        answers = [last_boxed(c) for c in completions]
        scores = [0.0] * len(completions)
        for members in groups.values():
            classes = answer_classes([answers[i] for i in members], backend=self.backend)
            best, _ = _majority_class(classes)
            for i, c in zip(members, classes):
                scores[i] = float(best is not None and c == best)
        self.count("scored", len(completions))
        self.count("no_answer", sum(a is None for a in answers))
        self.count("groups", len(groups))
        return scores


__all__ = ["MajorityVerifier", "answer_classes", "majority_vote"]
