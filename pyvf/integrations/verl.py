"""pyvf's `token_logprobs` behind verl's fused log-prob/entropy head (verl 0.9.1).

With `actor_rollout_ref.model.use_fused_kernels=True`, verl's model forward
(`verl/models/transformers/dense_common.py` and the VL variants) takes the final hidden
states, the lm_head weight, the next-token ids and the temperature, and gets the
per-token log-probs and entropies from

- `verl.utils.experimental.torch_functional.FusedLinearForPPO` (fused_kernels_backend
  "torch"): `forward(hidden_states, vocab_weights, input_ids, temperature)` ->
  (log_probs float32, entropy in the hidden dtype), shaped like `input_ids`;
- `verl.utils.kernel.linear_cross_entropy.linear_cross_entropy` (backend "triton"):
  `(hidden, weight, labels, temperature, reduction="none", dist_process_group=None)` ->
  (log_probs, entropy), float32, one per token, flattened.

This module gives both with the same signatures and return values, computed by
`pyvf.ops.token_logprobs` (no [tokens, vocab] logits, differentiable w.r.t. the hidden
states and the weight, including through the entropy), and `patch_verl()` swaps them into
verl. verl imports both names inside its forward functions (and the Megatron path at
module import), so patching the two modules before the model runs is enough. verl runs
its workers as Ray actors: let Ray call `patch_verl` in every worker process with
`+ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=pyvf.integrations.verl.patch_verl`
(see examples/verl_logprobs.md).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from pyvf.ops import token_logprobs

__all__ = ["fused_linear_for_ppo", "FusedLinearForPPO", "linear_cross_entropy", "patch_verl"]


def _check(hidden_states, vocab_weights, input_ids, temperature) -> None:
    for name, t in (("hidden_states", hidden_states), ("vocab_weights", vocab_weights), ("input_ids", input_ids)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden_states.dim() < 1 or tuple(input_ids.shape) != tuple(hidden_states.shape[:-1]):
        raise ValueError(f"input_ids shape {tuple(input_ids.shape)} must be hidden_states' shape without its last "
                         f"dim, {tuple(hidden_states.shape[:-1])}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a number, got {temperature!r}")


def fused_linear_for_ppo(hidden_states: torch.Tensor, vocab_weights: torch.Tensor, input_ids: torch.Tensor,
                         temperature: float = 1.0, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """verl's `FusedLinearForPPO.forward` contract: hidden_states [..., H], vocab_weights
    [V, H], input_ids [...] (the next tokens), temperature -> (log_probs float32,
    entropy in hidden_states' dtype), both shaped like input_ids. Every position is scored
    (verl passes rolled ids, valid everywhere)."""
    _check(hidden_states, vocab_weights, input_ids, temperature)
    flat_h = hidden_states.reshape(-1, hidden_states.shape[-1])
    if vocab_weights.dtype != flat_h.dtype:
        flat_h = flat_h.to(vocab_weights.dtype)
    logp, entropy = token_logprobs(flat_h, vocab_weights, input_ids.reshape(-1).long(), temperature=float(temperature),
                                   with_entropy=True, backend=backend)
    return logp.view(input_ids.shape), entropy.to(hidden_states.dtype).view(input_ids.shape)


class FusedLinearForPPO(nn.Module):
    """Drop-in for `verl.utils.experimental.torch_functional.FusedLinearForPPO`: same
    constructor (chunk_size and impl_backend are accepted and unused: token_logprobs
    tiles the vocabulary itself) and same forward."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        if impl_backend not in ("torch", "liger"):
            raise ValueError(f"impl_backend must be 'torch' or 'liger' (verl's names), got {impl_backend!r}")
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend

    def forward(self, hidden_states, vocab_weights, input_ids, temperature: float = 1.0):
        return fused_linear_for_ppo(hidden_states, vocab_weights, input_ids, temperature)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         temperature: float = 1.0, reduction: str = "none", dist_process_group=None):
    """Drop-in for `verl.utils.kernel.linear_cross_entropy.linear_cross_entropy` with
    reduction "none": (log_probs, entropy), float32, one per token, flattened."""
    if reduction != "none":
        raise ValueError(f"reduction must be 'none' (per-token log-probs, what verl's actor uses), got {reduction!r}")
    if dist_process_group is not None:
        raise ValueError("dist_process_group (a vocabulary-parallel lm_head) is not supported by pyvf's "
                         "token_logprobs; leave verl's own kernel in place for tensor-parallel heads")
    logp, entropy = fused_linear_for_ppo(hidden, weight, labels, temperature)
    return logp.reshape(-1), entropy.float().reshape(-1)


_PATCH_POINTS = (
    ("verl.utils.experimental.torch_functional", "FusedLinearForPPO", FusedLinearForPPO),
    ("verl.utils.kernel.linear_cross_entropy", "linear_cross_entropy", linear_cross_entropy),
)
# Modules that bind linear_cross_entropy at import: patched too when already imported.
_BOUND_AT_IMPORT = ("verl.models.mcore.model_forward_fused", "verl.models.mcore.model_forward_1f1b_overlap")


def patch_verl() -> list[str]:
    """Points verl's fused log-prob/entropy heads at pyvf. Call it in every process that
    runs the actor (verl's Ray workers: see the module docstring). Returns the names
    patched; raises ImportError when verl is not installed."""
    import importlib

    try:
        importlib.import_module("verl")
    except ImportError as exc:
        raise ImportError("patch_verl needs verl (pip install verl)") from exc
    patched = []
    for module_name, attr, replacement in _PATCH_POINTS:
        module = importlib.import_module(module_name)
        setattr(module, attr, replacement)
        patched.append(f"{module_name}.{attr}")
    for module_name in _BOUND_AT_IMPORT:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, "linear_cross_entropy"):
            module.linear_cross_entropy = linear_cross_entropy
            patched.append(f"{module_name}.linear_cross_entropy")
    return patched
