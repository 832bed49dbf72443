"""pyvf inside TRL (tested with trl 1.16.0, the pin of the `pyvf[trl]` extra).

- `VeriFreeTrainer`: TRL's `GRPOTrainer` with VeriFree's objective (docs/algorithms.md).
  Same `GRPOConfig`, a dataset with a `prompt` column and an `answer` column (one
  reference, or a list of equivalent ones), no reward functions. Each sampled completion
  is spliced token-exactly (`pyvf.splice`: the sampled ids before the marker are kept),
  and ONE forward with gradient over [prompt | reasoning | reference answer] gives both
  the reward pi(answer | prompt, reasoning) and the loss (`pyvf.losses.verifree_loss`
  on the packed spliced batch, log-probs from `pyvf.ops.token_logprobs`).
- `RLPRTrainer`: TRL's `GRPOTrainer` with RLPR's reward (docs/algorithms.md). A trainer and
  not a reward function, because the reward needs the policy's own probabilities of the
  reference (a TRL reward function gets text and ids, not the model) and a score of
  every training prompt by the *initial* policy before the first step.
- `patch_per_token_logps(trainer_or_model)`: TRL's fused LM head (the
  `model(..., labels=..., fused_lm_head=True)` path of GRPO, RLOO, SFT, DPO, KTO) computed
  by `token_logprobs` from the hidden states; the `[tokens, vocab]` logits are never
  built.

One module each: `verifree` (`VeriFreeTrainer`) and `rlpr` (`RLPRTrainer`), which import
TRL at their top, `fused_head` (`patch_per_token_logps`, `FusedLogprobsOutput`) and
`_common` (what the two trainers share), which do not. The trainers are importable from
here too, and TRL is imported only when a trainer class is first used; to subclass one,
`from pyvf.integrations.trl.verifree import VeriFreeTrainer` works the same.
"""

from __future__ import annotations

import importlib

from pyvf.integrations.trl._common import TESTED_TRL_VERSION
from pyvf.integrations.trl.fused_head import FusedLogprobsOutput, patch_per_token_logps

# The two trainers are imported on first access (module __getattr__), when TRL is imported.
__all__ = ["VeriFreeTrainer", "RLPRTrainer", "patch_per_token_logps", "FusedLogprobsOutput",  # noqa: F822
           "TESTED_TRL_VERSION"]

_TRAINER_MODULES = {"VeriFreeTrainer": "verifree", "RLPRTrainer": "rlpr"}


def __getattr__(name):
    if name in _TRAINER_MODULES:
        cls = getattr(importlib.import_module(f"{__name__}.{_TRAINER_MODULES[name]}"), name)
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
