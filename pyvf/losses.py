"""Objectives on packed batches of per-token log-probs.

`verifree_loss` is DESIGN.md 1.1 (and 1.2 for several references): everything comes
from one forward pass, the reward being the detached probability of the reference
answer after the reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pyvf.ops import grouped_advantages, segment_sum
from pyvf.packing import ROLE_ANSWER, ROLE_REASONING


@dataclass
class VerifreeOutput:
    loss: torch.Tensor            # scalar, differentiable
    rewards: torch.Tensor         # [C] per completion, detached: sum_k w_k pi(y*_k | x, z)
    advantages: torch.Tensor      # [C] RLOO advantages of the rewards
    reasoning_logprob: torch.Tensor  # [C] sum of reasoning log-probs (detached)
    reasoning_len: torch.Tensor   # [C] reasoning tokens
    answer_len: torch.Tensor      # [C] answer tokens (first reference)
    found: torch.Tensor           # [C] bool: the completion had the marker (answer tokens present)


def _per_completion_index(completion, n_seq, device):
    if completion is None:
        return torch.arange(n_seq, device=device), n_seq
    if completion.shape != (n_seq,):
        raise ValueError(f"completion must have shape [{n_seq}] (one entry per packed sequence), "
                         f"got {tuple(completion.shape)}")
    uniq, inverse = torch.unique(completion, return_inverse=True)
    return inverse, uniq.numel()


def verifree_loss(logprobs: torch.Tensor, roles: torch.Tensor, cu_seqlens: torch.Tensor, groups, *,
                  completion: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                  num_completions_total: int | None = None) -> VerifreeOutput:
    """The single-pass VeriFree objective.

    logprobs [T]: per-token log-probs of a packed batch (0 where not computed), roles
    [T] aligned with them (1 reasoning, 2 answer, anything else ignored), cu_seqlens
    [B + 1]. groups: an int G or group ids [B] (one entry per packed sequence).

    One packed sequence per (completion, reference). With several equivalent
    references, `completion` [B] says which completion each sequence belongs to and
    `weights` [B] weighs its reference (default uniform within the completion, summing
    to 1). Per completion i, with R_ik = exp(answer log-prob under reference k):
        R_i = sum_k w_k R_ik (detached), A_i = R_i - mean_{j != i in the group} R_j
        loss_i = -(A_i * sum_{t in z_i} log pi(t) + sum_k w_k R_ik * sum_{t in y_k} log pi(t))
    and the loss is the mean of loss_i over completions (or the sum divided by
    `num_completions_total`, for a micro-batch of a larger batch). A sequence without
    answer tokens (no marker, truncated, too long) has reward 0.
    """
    if logprobs.dim() != 1 or roles.shape != logprobs.shape:
        raise ValueError(f"logprobs and roles must be 1-D of the same length, got {tuple(logprobs.shape)} "
                         f"and {tuple(roles.shape)}")
    n_seq = cu_seqlens.numel() - 1
    device = logprobs.device
    is_reasoning = roles == ROLE_REASONING
    is_answer = roles == ROLE_ANSWER
    reasoning_sum = segment_sum(logprobs, cu_seqlens, mask=is_reasoning)
    answer_sum = segment_sum(logprobs, cu_seqlens, mask=is_answer)
    ones = torch.ones_like(logprobs)
    reasoning_len = segment_sum(ones, cu_seqlens, mask=is_reasoning).detach()
    answer_len = segment_sum(ones, cu_seqlens, mask=is_answer).detach()
    has_answer = answer_len > 0

    index, n_comp = _per_completion_index(completion, n_seq, device)
    if weights is None:
        copies = torch.zeros(n_comp, device=device).index_add_(0, index, torch.ones(n_seq, device=device))
        weights = 1.0 / copies[index]
    elif weights.shape != (n_seq,):
        raise ValueError(f"weights must have shape [{n_seq}], got {tuple(weights.shape)}")
    weights = weights.to(device=device, dtype=answer_sum.dtype)

    seq_reward = torch.where(has_answer, torch.exp(answer_sum.detach()), torch.zeros_like(answer_sum))
    rewards = torch.zeros(n_comp, dtype=answer_sum.dtype, device=device).index_add_(0, index, weights * seq_reward)

    # The reasoning is shared by a completion's copies: take it from the first one.
    first = torch.full((n_comp,), n_seq, dtype=torch.long, device=device).scatter_reduce_(
        0, index, torch.arange(n_seq, device=device), "amin")
    comp_groups = groups if isinstance(groups, int) else groups.to(device)[first]
    advantages = grouped_advantages(rewards, comp_groups, estimator="rloo")

    per_completion = -(advantages * reasoning_sum[first])
    sft = torch.zeros(n_comp, dtype=answer_sum.dtype, device=device).index_add(
        0, index, weights * seq_reward * answer_sum)
    per_completion = per_completion - sft
    denom = num_completions_total if num_completions_total is not None else n_comp
    return VerifreeOutput(
        loss=per_completion.sum() / denom,
        rewards=rewards.detach(), advantages=advantages,
        reasoning_logprob=reasoning_sum[first].detach(), reasoning_len=reasoning_len[first],
        answer_len=answer_len[first], found=has_answer[first],
    )
