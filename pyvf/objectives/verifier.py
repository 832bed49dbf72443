"""The verifier baseline (R1-Zero / GRPO, docs/algorithms.md): reward 1 when the
completion's last \\boxed{} is equivalent to a reference (math-verify when installed,
pyvf's normalizer otherwise), GRPO advantages, token-mean policy gradient."""

from __future__ import annotations

import torch

from pyvf.data.answers import boxed_correct
from pyvf.objectives.base import Objective, Sample, StepContext


def verifier_rewards(completions: list[str], references: list[list[str]], *, backend: str = "auto") -> torch.Tensor:
    """1.0 where the last \\boxed{...} of a completion matches any of its references, else 0.
    `backend` as in `pyvf.data.answers.is_equivalent`: math-verify when installed, pyvf's
    normalizer otherwise (or when asked for)."""
    return torch.tensor(boxed_correct(completions, references, backend=backend), dtype=torch.float64)


class VerifierBaseline(Objective):
    name = "verifier"

    def score(self, samples: list[Sample], ctx: StepContext) -> torch.Tensor:
        texts = [self.tokenizer.decode(s.ids, skip_special_tokens=True) for s in samples]
        return verifier_rewards(texts, [list(s.example.answers) for s in samples]).double()
