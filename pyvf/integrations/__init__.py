"""Adapters that put pyvf's objectives and ops inside other trainers.

- `pyvf.integrations.trl`: `VeriFreeTrainer` and `RLPRTrainer` (subclasses of TRL's
  `GRPOTrainer`) and `patch_per_token_logps` (TRL's fused LM head backed by
  `pyvf.ops.token_logprobs`). Needs the optional extra `pyvf[trl]`.
- `pyvf.integrations.verl`: a drop-in for verl's fused log-prob/entropy head.

Nothing here imports TRL or verl until it is used.
"""
