"""Plain PyTorch references of the ops, computed in float64.

They materialize whatever they need and favour the literal formula over speed:
tests compare every backend to them, and `backend="reference"` runs them.
"""

from __future__ import annotations

import torch


def group_index(groups, n: int, device: torch.device) -> torch.Tensor:
    """Dense group index in [0, n_groups) for each of the n rewards."""
    if isinstance(groups, int):
        return torch.arange(n, device=device) // groups
    return torch.unique(groups, return_inverse=True)[1]


def grouped_advantages_reference(rewards: torch.Tensor, groups, *, estimator: str = "rloo",
                                 eps: float = 1e-6) -> torch.Tensor:
    """Float64 advantages; NaN rewards and groups of one get 0, NaN rewards are left
    out of their group's statistics, groups whose valid rewards are equal get 0."""
    r = rewards.detach().double()
    n = r.numel()
    if n == 0:
        return r.clone()
    idx = group_index(groups, n, r.device)
    n_groups = int(idx.max()) + 1
    valid = ~torch.isnan(r)
    r0 = torch.where(valid, r, torch.zeros_like(r))
    zeros = torch.zeros(n_groups, dtype=torch.float64, device=r.device)
    count = zeros.index_add(0, idx, valid.double())
    total = zeros.index_add(0, idx, r0)
    mean = total / count.clamp(min=1)
    dev = torch.where(valid, r - mean[idx], torch.zeros_like(r))
    m2 = zeros.index_add(0, idx, dev * dev)
    inf = torch.full_like(zeros, float("inf"))
    lo = inf.scatter_reduce(0, idx, torch.where(valid, r, float("inf")), "amin")
    hi = (-inf).scatter_reduce(0, idx, torch.where(valid, r, float("-inf")), "amax")

    k = count[idx]
    if estimator == "rloo":
        others_mean = (total[idx] - r) / (k - 1)
        adv = r - others_mean
    elif estimator == "grpo":
        std = torch.sqrt(m2 / (count - 1))[idx]
        adv = (r - mean[idx]) / (std + eps)
    elif estimator == "drgrpo":
        adv = r - mean[idx]
    else:
        raise ValueError(f"estimator must be one of 'rloo', 'grpo', 'drgrpo', got {estimator!r}")
    degenerate = ~valid | (k < 2) | (lo[idx] == hi[idx])
    return torch.where(degenerate, torch.zeros_like(adv), adv)


def segment_sum_reference(values: torch.Tensor, cu_seqlens: torch.Tensor,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 per-segment sums of values (where mask), differentiable."""
    v = values.double()
    if mask is not None:
        v = v * mask.to(v.dtype)
    cu = cu_seqlens.long()
    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=v.device), cu.diff())
    return torch.zeros(cu.numel() - 1, dtype=v.dtype, device=v.device).index_add(0, seg, v)


def token_logprobs_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                             temperature: float = 1.0, ignore_index: int = -100,
                             with_entropy: bool = False):
    """Float64 log-probs (and entropies) through the full [N, V] logits; differentiable
    w.r.t. hidden and weight. Ignored rows give 0."""
    logits = (hidden.double() @ weight.double().t()) / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    logp = logp_all.gather(1, safe[:, None]).squeeze(1)
    zero = torch.zeros_like(logp)
    logp = torch.where(valid, logp, zero)
    if not with_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, torch.where(valid, entropy, zero)


def policy_loss_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          coeffs: torch.Tensor, *, temperature: float = 1.0, ignore_index: int = -100,
                          entropy_coeffs: torch.Tensor | None = None):
    """Float64 (loss, logprobs, entropy) through the full [N, V] logits: loss =
    sum_t coeffs[t] logp[t] (+ sum_t entropy_coeffs[t] entropy[t]) over the rows that
    are not ignored, differentiable w.r.t. hidden and weight; logprobs and entropy
    detached, 0 on ignored rows."""
    logp, entropy = token_logprobs_reference(hidden, weight, targets, temperature=temperature,
                                             ignore_index=ignore_index, with_entropy=True)
    valid = targets != ignore_index
    zero = torch.zeros_like(logp)
    loss = (torch.where(valid, coeffs.double(), zero) * logp).sum()
    if entropy_coeffs is not None:
        loss = loss + (torch.where(valid, entropy_coeffs.double(), zero) * entropy).sum()
    return loss, logp.detach(), entropy.detach()
