"""What every rollout engine shares: the `RolloutEngine` protocol, the `Completion` it
returns, and the checks of its arguments. Engines: `hf.py` (batched Hugging Face sampling,
the default) and `vllm.py` (in-process vLLM)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Completion:
    ids: list[int]         # sampled tokens, through the stop string's last token or the EOS when one ended it
    finish: str            # "stop" (a stop string), "eos" (an EOS id), "length" (max_new_tokens)
    logprobs: list[float]  # sampling log-prob of each token in ids (processed: after temperature)
    policy_version: int | None = None  # the weights' version that sampled it (engine processes); None: the trainer's own

    @property
    def truncated(self) -> bool:
        return self.finish == "length"


class RolloutEngine(Protocol):
    name: str  # "hf" or "vllm"
    # True when its samples come from the trainer's current weights with the trainer's
    # numerics (no importance weight is needed); an engine without it counts as True.
    on_policy: bool

    def generate(self, prompts: list[list[int]], n: int, *, max_new_tokens: int, temperature: float,
                 seeds: list[int], stop: list[str], min_new_tokens: int = 0) -> list[list[Completion]]:
        """n completions per prompt; what prompt i samples depends only on (prompts[i],
        seeds[i]) and the weights, never on the batch, its order or the rank. EOS is not
        sampled before `min_new_tokens` tokens. Temperature 0 decodes greedily (evaluation;
        training samples at a temperature > 0)."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Full (unsharded) weights after an optimizer step, names as in model.state_dict()."""

    def sleep(self) -> None:
        """Frees the engine's memory (KV cache) while the trainer runs."""

    def wake(self) -> None:
        """Undoes `sleep` before the next rollout."""


def validate_generate_args(prompts, n, max_new_tokens, temperature, seeds, stop, min_new_tokens=0) -> None:
    if not isinstance(prompts, (list, tuple)) or any(not isinstance(p, (list, tuple)) or not p for p in prompts):
        raise ValueError("prompts must be a list of non-empty lists of token ids")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature!r}")
    if len(seeds) != len(prompts):
        raise ValueError(f"seeds must have one seed per prompt: {len(seeds)} seeds for {len(prompts)} prompts")
    if isinstance(stop, str) or not isinstance(stop, (list, tuple)) or any(not isinstance(s, str) or not s for s in stop):
        raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
    if (isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int)
            or not 0 <= min_new_tokens <= max_new_tokens):
        raise ValueError(f"min_new_tokens must be an int in [0, max_new_tokens], got {min_new_tokens!r}")
