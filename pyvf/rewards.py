"""Reward formulas of the verifier-free family (DESIGN.md 1.3 to 1.7), as plain
functions on tensors so that any trainer can use them. VeriFree's own reward lives in
`pyvf.losses.verifree_loss`, which computes it from the same forward pass.

Group-wise quantities take `groups`, an integer tensor of group ids (one per
completion), like `pyvf.ops.grouped_advantages`.
"""

from __future__ import annotations

import torch

from pyvf.data.answers import is_equivalent, last_boxed
from pyvf.ops import segment_sum


# --- 1.7 verifier baseline -------------------------------------------------------------

def verifier_rewards(completions: list[str], references: list[list[str]]) -> torch.Tensor:
    """1.0 where the last \\boxed{...} of a completion matches any of its references after
    normalization (whitespace, \\boxed, equivalent numbers such as 8/5 and 1.6), else 0."""
    if len(completions) != len(references):
        raise ValueError(f"completions and references must have the same length, got {len(completions)} "
                         f"and {len(references)}")
    return torch.tensor([float(is_equivalent(last_boxed(c), list(r))) for c, r in zip(completions, references)])


# --- 1.3 RLPR --------------------------------------------------------------------------

def rlpr_score(logprobs: torch.Tensor, span_mask: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Mean per-token probability of the reference-span tokens of each packed sequence
    (0 for a sequence without span tokens)."""
    probs = segment_sum(torch.exp(logprobs.detach()), cu_seqlens, mask=span_mask)
    count = segment_sum(torch.ones_like(logprobs), cu_seqlens, mask=span_mask)
    return torch.where(count > 0, probs / count.clamp(min=1), torch.zeros_like(probs))


def rlpr_rewards(score_with_reasoning: torch.Tensor, score_without: torch.Tensor, format_ok: torch.Tensor,
                 *, weight: float = 0.9) -> torch.Tensor:
    """weight * max(0, B - A) + (1 - weight) * format, B the score after the reasoning,
    A the cached score of the reference right after the prompt."""
    gain = (score_with_reasoning - score_without).clamp(min=0)
    return weight * gain + (1 - weight) * format_ok.to(gain.dtype)


class RewardStdFilter:
    """RLPR's prompt filter: keep a prompt when its group's reward std is at least
    `ratio` times an exponential moving average (decay `decay`) of those stds. The
    average starts at the first batch's mean std; `state_dict` makes it resumable."""

    def __init__(self, ratio: float = 0.5, decay: float = 0.99):
        self.ratio, self.decay = ratio, decay
        self.ema: float | None = None

    def __call__(self, rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Boolean mask over completions: True for the members of kept groups."""
        ids, inverse = torch.unique(groups, return_inverse=True)
        stds = torch.stack([rewards[inverse == g].double().std(unbiased=True) if (inverse == g).sum() > 1
                            else torch.zeros((), dtype=torch.float64) for g in range(ids.numel())])
        batch_mean = float(stds.mean())
        self.ema = batch_mean if self.ema is None else self.decay * self.ema + (1 - self.decay) * batch_mean
        keep_group = stds >= self.ratio * self.ema
        return keep_group[inverse]

    def state_dict(self) -> dict:
        return {"ratio": self.ratio, "decay": self.decay, "ema": self.ema}

    def load_state_dict(self, state: dict) -> None:
        self.ratio, self.decay, self.ema = state["ratio"], state["decay"], state["ema"]


# --- 1.4 NOVER -------------------------------------------------------------------------

def nover_perplexity(nll_mean: torch.Tensor, reasoning_len: torch.Tensor) -> torch.Tensor:
    """exp(NLL_mean(ref | x, z) / N(|z|)) with N(|z|) = max(1, 1 + log10(|z|))."""
    norm = torch.clamp(1 + torch.log10(reasoning_len.double().clamp(min=1)), min=1.0)
    return torch.exp(nll_mean.double() / norm)


def nover_rewards(perplexity: torch.Tensor, reasoning_len: torch.Tensor, valid: torch.Tensor,
                  groups: torch.Tensor, *, weights: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """Total = w_f R_f + 1{R_f = 1} (w_r R_r + w_e R_e), computed per group among the
    valid (well-formatted) completions:
      R_f = 1 for a valid completion, else 0;
      R_r = (n_valid - rank(P_i)) / n_valid, rank 0 for the lowest perplexity (ties share
            the better rank);
      R_e = #{j valid: |z_i| < |z_j| and P_i < P_j} / (n_valid - 1) (0 when n_valid = 1)."""
    w_f, w_r, w_e = weights
    out = torch.zeros(perplexity.shape, dtype=torch.float64)
    valid = valid.bool()
    for g in torch.unique(groups).tolist():
        members = ((groups == g) & valid).nonzero().squeeze(1).tolist()
        n = len(members)
        for i in members:
            p_i, l_i = float(perplexity[i]), float(reasoning_len[i])
            rank = sum(1 for j in members if float(perplexity[j]) < p_i)
            r_rank = (n - rank) / n
            shorter_and_better = sum(1 for j in members
                                     if l_i < float(reasoning_len[j]) and p_i < float(perplexity[j]))
            r_eff = shorter_and_better / (n - 1) if n > 1 else 0.0
            out[i] = w_f + w_r * r_rank + w_e * r_eff
    return out


# --- 1.5 PCL ---------------------------------------------------------------------------

def pcl_consistency(ground_truth: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """1 - mean_k |gt_k - pred_k| / max(gt_k, pred_k), a 0/0 term counting as a perfect
    match; rows are completions, columns the reward components (accuracy, format)."""
    gt, pred = ground_truth.double(), predicted.double()
    denom = torch.maximum(gt, pred)
    term = torch.where(denom == 0, torch.zeros_like(denom), (gt - pred).abs() / torch.where(denom == 0, 1.0, denom))
    return 1 - term.mean(dim=-1)


__all__ = [
    "verifier_rewards", "rlpr_score", "rlpr_rewards", "RewardStdFilter", "nover_perplexity", "nover_rewards",
    "pcl_consistency",
]
