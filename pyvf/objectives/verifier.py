"""The verifier baseline (R1-Zero / GRPO, docs/algorithms.md): reward 1 when the
completion's last \\boxed{} is equivalent to a reference (math-verify when installed,
pyvf's normalizer otherwise), GRPO advantages, token-mean policy gradient."""

from __future__ import annotations

import torch

from pyvf.objectives.base import Objective, Sample, StepContext
from pyvf.data.answers import is_equivalent, last_boxed


def verifier_rewards(completions: list[str], references: list[list[str]], *, backend: str = "auto") -> torch.Tensor:
    """1.0 where the last \\boxed{...} of a completion matches any of its references, else 0.
    `backend` as in `pyvf.data.answers.is_equivalent`: math-verify when installed, pyvf's
    normalizer otherwise (or when asked for)."""
    if len(completions) != len(references):
        raise ValueError(f"completions and references must have the same length, got {len(completions)} "
                         f"and {len(references)}")
    return torch.tensor([float(is_equivalent(last_boxed(c), list(r), backend=backend))
                         for c, r in zip(completions, references)], dtype=torch.float64)


class Verifier(Objective):
    name = "verifier"
    loss_agg = "token_mean"

    def score(self, samples: list[Sample], ctx: StepContext) -> torch.Tensor:
        texts = [self.tokenizer.decode(s.ids, skip_special_tokens=True) for s in samples]
        return verifier_rewards(texts, [list(s.example.answers) for s in samples]).double()
