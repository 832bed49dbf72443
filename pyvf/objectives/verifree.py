"""VeriFree (docs/algorithms.md): the policy scores its own
reasoning by the probability it gives the reference answer after it.

Per completion i with references k (weights w_k, summing to 1):
    R_ik = pi(y*_k | x, z_i) = exp(sum of the answer tokens' log-probs), detached
    R_i = sum_k w_k R_ik, A_i = R_i - mean_{j != i in the group} R_j (RLOO)
    loss_i = -(A_i * sum_{t in z_i} log pi(t) + sum_k w_k R_ik * sum_{t in y_k} log pi(t))
token sum within a completion, mean over completions. No marker, a truncated
completion, or a spliced sequence over the length limit gives R_i = 0.

Single pass: the rewards need only the answer rows' log-probs, so the trainer's one
decoder forward gives the hidden states, `look` takes the answer rows first (no grad),
and `coefficients` hands the fused lm_head pass -A_i on the reasoning rows and
-w_k R_ik on the answer rows. That needs a group's sequences in one micro-batch; for a
group over the budget the trainer first runs a no-grad forward of the answer rows
(`rewards_from_look`: the separate reward pass, as the official code always does), and
the coefficients read the rewards kept per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pyvf.objectives.base import (
    LOSS_AGGREGATIONS, MicroBatch, Objective, ObjectiveConfig, Sample, StepContext, TrainSequences, add_metric,
)
from pyvf.ops import grouped_advantages, segment_sum
from pyvf.options import option
from pyvf.packing import ROLE_ANSWER, ROLE_REASONING, Sequence
from pyvf.splice import splice_reference


def verifree_rewards(answer_sum: torch.Tensor, has_answer: torch.Tensor, index: torch.Tensor, n_comp: int,
                     weights: torch.Tensor, comp_groups, extra_rewards: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-sequence reward R_ik, per-completion reward R_i, RLOO advantage A_i), all
    detached. answer_sum [B]: answer log-prob of each packed sequence; index [B]: its
    completion; weights [B]: its reference weight; comp_groups: group of each completion;
    extra_rewards [C]: added to R_i before the advantages (another verifier's score)."""
    answer_sum = answer_sum.detach()
    seq_reward = torch.where(has_answer, torch.exp(answer_sum), torch.zeros_like(answer_sum))
    rewards = torch.zeros(n_comp, dtype=answer_sum.dtype, device=answer_sum.device).index_add_(
        0, index, weights.to(answer_sum.dtype) * seq_reward)
    if extra_rewards is not None:
        rewards = rewards + extra_rewards.to(rewards.device, rewards.dtype)
    advantages = grouped_advantages(rewards.float(), comp_groups, estimator="rloo").to(answer_sum.dtype)
    return seq_reward, rewards, advantages


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


def _first_of_each(index: torch.Tensor, n_comp: int) -> torch.Tensor:
    """The first packed sequence of each completion (the copy that carries its reasoning)."""
    n_seq = index.numel()
    return torch.full((n_comp,), n_seq, dtype=torch.long, device=index.device).scatter_reduce_(
        0, index, torch.arange(n_seq, device=index.device), "amin")


def verifree_loss(logprobs: torch.Tensor, roles: torch.Tensor, cu_seqlens: torch.Tensor, groups, *,
                  completion: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                  num_completions_total: int | None = None) -> VerifreeOutput:
    """The single-pass VeriFree objective on per-token log-probs of a packed batch, for
    use inside another trainer (pyvf's own trainer hands the same coefficients to the
    fused lm_head pass instead).

    logprobs [T]: per-token log-probs of a packed batch (0 where not computed), roles
    [T] aligned with them (1 reasoning, 2 answer, anything else ignored), cu_seqlens
    [B + 1]. groups: an int G or group ids [B] (one entry per packed sequence).

    One packed sequence per (completion, reference). With several equivalent
    references, `completion` [B] says which completion each sequence belongs to and
    `weights` [B] weighs its reference (default uniform within the completion, summing
    to 1). The loss is the mean of loss_i over completions (or the sum divided by
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

    first = _first_of_each(index, n_comp)
    comp_groups = groups if isinstance(groups, int) else groups.to(device)[first]
    seq_reward, rewards, advantages = verifree_rewards(answer_sum, has_answer, index, n_comp, weights, comp_groups)

    per_completion = -(advantages * reasoning_sum[first])
    sft = torch.zeros(n_comp, dtype=answer_sum.dtype, device=device).index_add(
        0, index, weights * seq_reward * answer_sum)
    per_completion = per_completion - sft
    denom = num_completions_total if num_completions_total is not None else n_comp
    return VerifreeOutput(
        loss=per_completion.sum() / denom,
        rewards=rewards, advantages=advantages,
        reasoning_logprob=reasoning_sum[first].detach(), reasoning_len=reasoning_len[first],
        answer_len=answer_len[first], found=has_answer[first],
    )


@dataclass
class VerifreeCoefficients:
    coeffs: torch.Tensor          # [T] float64: -A_i on reasoning rows (first copy), -w_k R_ik on answer rows
    rewards: torch.Tensor         # [C] per completion
    advantages: torch.Tensor      # [C]
    found: torch.Tensor           # [C] bool: an answer was scored
    answer_len: torch.Tensor      # [C] answer tokens of the first copy


def verifree_coefficients(answer_logprobs: torch.Tensor, roles: torch.Tensor, cu_seqlens: torch.Tensor,
                          groups: torch.Tensor, *, completion: torch.Tensor | None = None,
                          weights: torch.Tensor | None = None, first_copy: torch.Tensor | None = None,
                          extra_rewards: torch.Tensor | None = None) -> VerifreeCoefficients:
    """VeriFree's gradient as per-row coefficients of the log-probs (the single pass:
    only the answer rows' log-probs are needed to know them). answer_logprobs [T]: the
    current log-probs, read on the answer rows only; roles [T], cu_seqlens [B + 1],
    groups [B], completion / weights [B] as in `verifree_loss`. `first_copy` [B] marks the
    sequence of each completion that carries its reasoning (default: the first).
    extra_rewards [C], per completion in the order of `completion`'s sorted ids, adds to
    R_i before the advantages (the trainer's `reward` verifier)."""
    device = answer_logprobs.device
    n_seq = cu_seqlens.numel() - 1
    is_answer = roles == ROLE_ANSWER
    answer_sum = segment_sum(answer_logprobs.double(), cu_seqlens, mask=is_answer)
    answer_len = segment_sum(torch.ones_like(answer_logprobs), cu_seqlens, mask=is_answer)
    index, n_comp = _per_completion_index(completion, n_seq, device)
    if weights is None:
        copies = torch.zeros(n_comp, device=device).index_add_(0, index, torch.ones(n_seq, device=device))
        weights = 1.0 / copies[index]
    weights = weights.to(device=device, dtype=torch.float64)
    first = _first_of_each(index, n_comp)
    if first_copy is None:
        first_copy = torch.zeros(n_seq, dtype=torch.bool, device=device).index_fill_(0, first, True)
    seq_reward, rewards, advantages = verifree_rewards(answer_sum, answer_len > 0, index, n_comp, weights,
                                                       groups.to(device)[first], extra_rewards)
    coeffs = verifree_row_coefficients(roles, cu_seqlens, advantages[index], seq_reward, weights, first_copy)
    return VerifreeCoefficients(coeffs, rewards, advantages, answer_len[first] > 0, answer_len[first])


def verifree_row_coefficients(roles: torch.Tensor, cu_seqlens: torch.Tensor, seq_advantage: torch.Tensor,
                              seq_reward: torch.Tensor, weights: torch.Tensor, first_copy: torch.Tensor
                              ) -> torch.Tensor:
    """[T] float64 coefficients from per-sequence values [B]: -A_i on the reasoning rows of
    the copy that carries a completion's reasoning, -w_k R_ik on the answer rows, 0
    elsewhere."""
    device = roles.device
    n_seq = cu_seqlens.numel() - 1
    row_seq = torch.repeat_interleave(torch.arange(n_seq, device=device), cu_seqlens.to(device).diff(),
                                      output_size=roles.numel())
    seq_advantage, seq_reward, weights = (t.to(device, torch.float64) for t in (seq_advantage, seq_reward, weights))
    zero = torch.zeros((), dtype=torch.float64, device=device)
    reasoning = torch.where(first_copy.to(device), -seq_advantage, zero)
    return torch.where(roles == ROLE_REASONING, reasoning[row_seq],
                       torch.where(roles == ROLE_ANSWER, -(weights * seq_reward)[row_seq], zero))


@dataclass
class VeriFreeConfig(ObjectiveConfig):
    loss_agg: str = option("seq_mean_token_sum", "official: the sum over a completion's tokens, averaged over "
                           "completions", choices=LOSS_AGGREGATIONS)


class VeriFree(Objective):
    name = "verifree"
    Config = VeriFreeConfig
    advantage_estimator = "rloo"

    def sequences(self, samples: list[Sample]) -> TrainSequences:
        """prompt | reasoning through the marker | reference answer, one sequence per
        (completion, reference); the completion as sampled where it has no answer."""
        cfg = self.cfg
        seqs, owner, prefix, weights, first_copy = [], [], [], [], []
        limit = self.length_limit
        for i, s in enumerate(samples):
            room = max(0, limit - len(s.prompt_ids))
            spliced = splice_reference(self.tokenizer, s.ids, list(s.example.answers), marker=cfg.marker,
                                       answer_template=cfg.answer_template)
            if s.truncated or not spliced[0].found:
                # Reward 0; the completion as sampled still gets its policy-gradient term.
                ids = s.ids[:room]
                s.over_length |= len(ids) < len(s.ids)
                seqs.append(Sequence(s.prompt_ids, ids, [], group=s.group))
                owner.append(i), prefix.append(len(ids)), weights.append(1.0), first_copy.append(True)
                continue
            for k, (sp, w) in enumerate(zip(spliced, s.example.weights)):
                reasoning = sp.reasoning_ids[:room]
                answer = sp.answer_ids
                if len(s.prompt_ids) + len(sp.reasoning_ids) + len(answer) > limit:
                    answer = []  # over the length limit: reward 0
                    s.over_length = True
                seqs.append(Sequence(s.prompt_ids, reasoning, answer, group=s.group))
                owner.append(i)
                prefix.append(min(sp.n_kept, len(reasoning)) if k == 0 else 0)
                weights.append(w)
                first_copy.append(k == 0)
        return TrainSequences(seqs, owner, prefix, {"weight": weights, "first_copy": first_copy})

    def look(self, mb: MicroBatch, ctx: StepContext) -> torch.Tensor | None:
        if _scored_before(mb):
            return None  # the separate reward pass has the rewards already
        return mb.batch.roles.to(mb.device) == ROLE_ANSWER

    def rewards_from_look(self, train: TrainSequences, index: list[int], looked: list[torch.Tensor],
                          ctx: StepContext) -> None:
        """The rewards and advantages of whole groups from their answer rows' log-probs
        (a no-grad forward), kept per sequence for `coefficients`."""
        n = len(train.sequences)
        train.data.setdefault("seq_reward", [None] * n)
        train.data.setdefault("advantage", [None] * n)
        if not index:
            return
        owner = torch.tensor([train.owner[i] for i in index])
        completions, inverse = torch.unique(owner, return_inverse=True)
        first = _first_of_each(inverse, completions.numel())
        answer_len = torch.tensor([float(lp.numel()) for lp in looked], dtype=torch.float64)
        seq_reward, rewards, advantages = verifree_rewards(
            torch.tensor([float(lp.sum()) for lp in looked], dtype=torch.float64), answer_len > 0, inverse,
            completions.numel(), torch.tensor([train.data["weight"][i] for i in index], dtype=torch.float64),
            torch.tensor([train.sequences[index[j]].group for j in first.tolist()]),
            None if ctx.extra_rewards is None else ctx.extra_rewards[completions])
        for j, i in enumerate(index):
            train.data["seq_reward"][i] = float(seq_reward[j])
            train.data["advantage"][i] = float(advantages[inverse[j]])
        self._add_reward_metrics(ctx, rewards, advantages, answer_len[first])

    def coefficients(self, mb: MicroBatch, looked: torch.Tensor | None, ctx: StepContext):
        batch, device = mb.batch, mb.device
        weights = torch.tensor(mb.data["weight"], dtype=torch.float64, device=device)
        first_copy = torch.tensor(mb.data["first_copy"], device=device)
        if _scored_before(mb):
            return verifree_row_coefficients(batch.roles.to(device), batch.cu_seqlens, torch.tensor(
                mb.data["advantage"]), torch.tensor(mb.data["seq_reward"]), weights, first_copy), None
        out = verifree_coefficients(
            looked, batch.roles.to(device), batch.cu_seqlens.to(device), batch.groups.to(device),
            completion=mb.owner.to(device), weights=weights, first_copy=first_copy,
            extra_rewards=None if ctx.extra_rewards is None else ctx.extra_rewards[torch.unique(mb.owner)])
        self._add_reward_metrics(ctx, out.rewards, out.advantages, out.answer_len)
        return out.coeffs, None

    @staticmethod
    def _add_reward_metrics(ctx: StepContext, rewards: torch.Tensor, advantages: torch.Tensor,
                            answer_len: torch.Tensor) -> None:
        n, m = rewards.numel(), ctx.metrics
        add_metric(m, "reward_mean", rewards.sum().item(), n)
        add_metric(m, "advantage_std", (advantages.double() ** 2).sum().item(), n, root=True)
        add_metric(m, "rewarded_frac", (answer_len > 0).sum().item(), n)
        add_metric(m, "answer_len", answer_len.sum().item(), n)


def _scored_before(mb: MicroBatch) -> bool:
    """Whether the separate reward pass scored this micro-batch's sequences (the trainer
    never mixes them with sequences rewarded in the gradient forward)."""
    done = [a is not None for a in mb.data.get("advantage", [None] * len(mb.index))]
    if any(done) != all(done):
        raise ValueError("a micro-batch mixes sequences scored by the separate reward pass with others")
    return all(done) and bool(done)
