"""The policy as the trainer uses it: one decoder forward over a packed batch, then the
lm_head on the trained rows only, never the model's full logits.

Two calls:
- `policy(batch, temperature, look=None)` -> per-token log-probs (scoring, no
  coefficients; with a row mask `look`, only those rows go through the lm_head);
- `policy(batch, temperature, coefficients=fn, look=mask)` -> (loss, logprobs, entropy):
  the objective's no-grad look at the `look` rows, then its coefficients, then the
  lm_head pass. `lm_head_pass="fused"` runs `pyvf.ops.policy_loss` (logits, dz and
  both gradients in one pass, 6NHV); "autograd" runs `token_logprobs` and lets
  autograd do the backward (8NHV), for comparison and for models that need it;
  "full_logits" builds the [T, V] logits and their fp32 log-softmax, as a trainer
  without fused kernels does (a baseline for benchmarks).
Being a module (rather than a function reaching into `model.lm_head`) lets FSDP2
gather the lm_head for the pass.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pyvf.ops import policy_loss, token_logprobs
from pyvf.packing import PackedBatch, Sequence, pack, plan_micro_batches
from pyvf.runtime import distributed
from pyvf.runtime.model import decoder_hidden_states

LM_HEAD_PASSES = ("fused", "autograd", "full_logits")

CoefficientFn = Callable[[torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]]


class Policy(nn.Module):
    def __init__(self, model: nn.Module, *, backend: str = "auto", lm_head_pass: str = "fused"):
        super().__init__()
        if lm_head_pass not in LM_HEAD_PASSES:
            raise ValueError(f"lm_head_pass must be one of {', '.join(LM_HEAD_PASSES)}, got {lm_head_pass!r}")
        self.model = model
        self.backend = backend
        self.lm_head_pass = lm_head_pass

    def forward(self, batch: PackedBatch, temperature: float = 1.0, coefficients: CoefficientFn | None = None,
                look: torch.Tensor | None = None, with_entropy: bool = False):
        weight = self.model.get_output_embeddings().weight
        device = weight.device
        hidden = decoder_hidden_states(self.model, batch)
        targets = batch.targets.to(device)
        common = dict(temperature=temperature, ignore_index=batch.ignore_index)
        if coefficients is None:
            if look is not None:  # only these rows through the lm_head (the others give 0)
                targets = torch.where(look.to(device), targets, torch.full_like(targets, batch.ignore_index))
            return token_logprobs(hidden, weight, targets, with_entropy=with_entropy, backend=self.backend, **common)

        if self.lm_head_pass != "fused":
            logp, entropy = (token_logprobs(hidden, weight, targets, with_entropy=True, backend=self.backend, **common)
                             if self.lm_head_pass == "autograd" else
                             _full_logits_logprobs(hidden, weight, targets, temperature, batch.ignore_index))
            coeffs, entropy_coeffs = coefficients(None if look is None else logp.detach())
            loss = (coeffs.to(logp.dtype) * logp).sum()
            if entropy_coeffs is not None:
                loss = loss + (entropy_coeffs.to(entropy.dtype) * entropy).sum()
            return loss, logp.detach(), entropy.detach()

        looked = None
        if look is not None:
            with torch.no_grad():
                looked = token_logprobs(hidden.detach(), weight.detach(),
                                        torch.where(look, targets, torch.full_like(targets, batch.ignore_index)),
                                        backend=self.backend, **common)
        coeffs, entropy_coeffs = coefficients(looked)
        return policy_loss(hidden, weight, targets, coeffs.float(),
                           entropy_coeffs=None if entropy_coeffs is None else entropy_coeffs.float(),
                           backend=self.backend if self.backend != "reference" else "reference", **common)


def _full_logits_logprobs(hidden, weight, targets, temperature: float, ignore_index: int):
    """(log-probs of the targets, entropies) through the [T, V] logits, differentiable."""
    logp_all = torch.log_softmax((hidden @ weight.T).float() / temperature, dim=-1)
    valid = targets != ignore_index
    logp = logp_all.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, entropy, 0.0)


@torch.no_grad()
def score_rows(policy, sequences: list[Sequence], token_budget: int, *, temperature: float,
               device: torch.device) -> list[torch.Tensor]:
    """No-grad log-probs of every non-prompt token of each sequence (reasoning, answer,
    post, in order), one CPU tensor per sequence, in packed chunks of at most
    `token_budget` tokens. Every rank runs as many forwards as the busiest one, so a
    sharded policy's collectives pair up. Every sequence needs a prompt (the row before
    its first scored token)."""
    if any(not s.prompt_ids for s in sequences):
        raise ValueError("sequences: score_rows needs a non-empty prompt in every sequence")
    plan = plan_micro_batches([len(s) for s in sequences], list(range(len(sequences))), token_budget) \
        if sequences else []
    n_chunks = int(distributed.all_max(float(len(plan)), device))
    out: list[torch.Tensor | None] = [None] * len(sequences)
    for k in range(n_chunks):
        chunk = plan[k] if k < len(plan) else None
        seqs = [sequences[i] for i in chunk] if chunk else [Sequence([0], [0], [], group=0)]
        batch = pack(seqs)
        logprobs = policy(batch, temperature).detach().cpu().double()
        if chunk is None:
            continue
        starts = batch.cu_seqlens.tolist()
        for b, (i, seq) in enumerate(zip(chunk, seqs)):
            first = starts[b] + len(seq.prompt_ids) - 1  # the row that predicts the first non-prompt token
            out[i] = logprobs[first:first + len(seq) - len(seq.prompt_ids)]
    return out
