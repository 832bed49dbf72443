"""`rule`: math answer equivalence. 1.0 when the completion's last \\boxed{...} matches
any reference (8/5 == 1.6 == \\frac{8}{5}; math-verify when installed, pyvf's normalizer
otherwise: see pyvf.data.answers), else 0.0. The verifier baseline's reward
(pyvf.objectives.verifier), as a verifier: both are pyvf.data.answers.boxed_correct."""

from __future__ import annotations

from pyvf.data.answers import boxed_correct, last_boxed
from pyvf.verify.base import AnswerVerifier, check_batch


class RuleVerifier(AnswerVerifier):
    """stats: `scored`, `no_answer` (no \\boxed{} in the completion), `correct`."""

    name = "rule"

    def __call__(self, prompts, completions, references=None) -> list[float]:
        prompts, completions, references = check_batch(prompts, completions, references, need_references=True,
                                                       who=self.name)
        correct = boxed_correct(completions, [[r for r in refs if r.strip()] for refs in references],
                                backend=self.backend)
        scores = [float(ok) for ok in correct]
        missing = sum(last_boxed(c) is None for c in completions)
        if missing:
            self.count("no_answer", missing)
        self.count("scored", len(scores))
        self.count("correct", sum(scores))
        return scores


__all__ = ["RuleVerifier"]
