"""`rule`: math answer equivalence. 1.0 when the completion's last \\boxed{...} matches
any reference (8/5 == 1.6 == \\frac{8}{5}; math-verify when installed, pyvf's normalizer
otherwise: see pyvf.data.answers), else 0.0. The verifier baseline's reward
(pyvf.objectives.verifier), as a verifier."""

from __future__ import annotations

from pyvf.data.answers import BACKENDS, is_equivalent, last_boxed
from pyvf.verify.base import BaseVerifier, check_batch


class RuleVerifier(BaseVerifier):
    """stats: `scored`, `no_answer` (no \\boxed{} in the completion), `correct`."""

    name = "rule"

    def __init__(self, *, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    def __call__(self, prompts, completions, references=None) -> list[float]:
        prompts, completions, references = check_batch(prompts, completions, references, need_references=True,
                                                       who=self.name)
        scores = []
        for completion, refs in zip(completions, references):
            answer = last_boxed(completion)
            if answer is None:
                self.count("no_answer")
            ok = is_equivalent(answer, [r for r in refs if r.strip()], backend=self.backend)
            scores.append(float(ok))
        self.count("scored", len(scores))
        self.count("correct", sum(scores))
        return scores


__all__ = ["RuleVerifier"]
