"""VeriFree (docs/algorithms.md): the policy scores its own
reasoning by the probability it gives the reference answer after it.

Per completion i with references k (weights w_k, summing to 1):
    R_ik = pi(y*_k | x, z_i) = exp(sum of the answer tokens' log-probs), detached
    R_i = sum_k w_k R_ik, A_i = R_i - mean_{j != i in the group} R_j (RLOO)
    loss_i = -(A_i * sum_{t in z_i} log pi(t) + sum_k w_k R_ik * sum_{t in y_k} log pi(t))
token sum within a completion, mean over completions. No marker, a truncated
completion, or a spliced sequence over the length limit gives R_i = 0.

`reward_form` swaps R_ik for another likelihood reward of the reference
(`pyvf.verify.verifree.reference_rewards`: logprob, mean_logprob, mean_prob); the
estimator keeps its shape, the answer rows' weight becoming dR_ik / d log pi(t) (1 for
logprob: the reference's log-likelihood gradient unweighted). The log forms score every
completion (the marker appended where it is missing). `JEPO` (below) is the
multi-sample Jensen bound log (1/G) sum_i pi(y* | x, z_i) with its own estimator.

Single pass: the rewards need only the answer rows' log-probs, so the trainer's one
decoder forward gives the hidden states, `look` takes the answer rows first (no grad),
and `coefficients` hands the fused lm_head pass -A_i on the reasoning rows and
-w_k dR_ik on the answer rows. That needs a group's sequences in one micro-batch; for a
group over the budget the trainer first runs a no-grad forward of the answer rows
(`rewards_from_look`: the separate reward pass, as the official code always does), and
the coefficients read what it kept per sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pyvf.objectives.base import (
    LOSS_AGGREGATIONS, MicroBatch, Objective, ObjectiveConfig, Sample, StepContext, TrainSequences, add_metric,
)
from pyvf.ops import grouped_advantages, segment_sum
from pyvf.options import option
from pyvf.packing import ROLE_ANSWER, ROLE_REASONING, Sequence
from pyvf.verify.verifree import REWARD_FORMS, fit_reasoning, reference_rewards, splice_answers


def verifree_rewards(seq_reward: torch.Tensor, index: torch.Tensor, n_comp: int, weights: torch.Tensor, comp_groups,
                     extra_rewards: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-completion reward R_i = sum_k w_k R_ik, its RLOO advantage A_i), detached.
    seq_reward [B]: R_ik of each packed sequence; index [B]: its completion; weights [B]:
    its reference weight; comp_groups: the group of each completion; extra_rewards [C]:
    added to R_i before the advantages (another verifier's score)."""
    seq_reward = seq_reward.detach()
    rewards = torch.zeros(n_comp, dtype=seq_reward.dtype, device=seq_reward.device).index_add_(
        0, index, weights.to(seq_reward.dtype) * seq_reward)
    if extra_rewards is not None:
        rewards = rewards + extra_rewards.to(rewards.device, rewards.dtype)
    advantages = grouped_advantages(rewards.float(), comp_groups, estimator="rloo").to(seq_reward.dtype)
    return rewards, advantages


@dataclass
class ForwardTerms:
    """What the coefficients of rewards read in the forward are made of, per packed
    sequence and per answer row (float64, detached)."""
    seq_advantage: torch.Tensor   # [B] the advantage of each sequence's completion
    answer_coeffs: torch.Tensor   # [R] the coefficient of each answer row's log-prob
    rewards: torch.Tensor         # [C] per completion
    advantages: torch.Tensor      # [C]
    answer_len: torch.Tensor      # [C] answer tokens of each completion's first copy
    bound: torch.Tensor | None = None  # [C] JEPO: the group's bound log (1/G) sum_j p_j


def _first_of_each(index: torch.Tensor, n_comp: int) -> torch.Tensor:
    """The first packed sequence of each completion (the copy that carries its reasoning)."""
    n_seq = index.numel()
    return torch.full((n_comp,), n_seq, dtype=torch.long, device=index.device).scatter_reduce_(
        0, index, torch.arange(n_seq, device=index.device), "amin")


def verifree_terms(answer_logprobs: torch.Tensor, row_seq: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                   comp_groups: torch.Tensor, *, reward_form: str = "prob",
                   extra_rewards: torch.Tensor | None = None) -> ForwardTerms:
    """VeriFree's estimator from the answer rows' log-probs [R] (row_seq [R]: each row's
    packed sequence; index [B]: each sequence's completion, 0..C-1; weights [B];
    comp_groups [C]): R_ik in `reward_form`, A_i = RLOO of R_i, and -w_k dR_ik / dl_t
    on the answer rows."""
    n_seq, n_comp = index.numel(), comp_groups.numel()
    seq_reward, d_reward = reference_rewards(reward_form, answer_logprobs, row_seq, n_seq)
    weights = weights.to(seq_reward.device, torch.float64)
    rewards, advantages = verifree_rewards(seq_reward, index, n_comp, weights, comp_groups, extra_rewards)
    length = torch.zeros(n_seq, dtype=torch.float64, device=seq_reward.device).index_add_(
        0, row_seq, torch.ones_like(d_reward))
    return ForwardTerms(advantages[index], -weights[row_seq] * d_reward, rewards, advantages,
                        length[_first_of_each(index, n_comp)])


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
                  num_completions_total: int | None = None, reward_form: str = "prob") -> VerifreeOutput:
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
    answer tokens (no marker, truncated, too long) has reward 0. `reward_form`: the
    reward of the reference (module docstring), prob by default.
    """
    if logprobs.dim() != 1 or roles.shape != logprobs.shape:
        raise ValueError(f"logprobs and roles must be 1-D of the same length, got {tuple(logprobs.shape)} "
                         f"and {tuple(roles.shape)}")
    n_seq = cu_seqlens.numel() - 1
    device = logprobs.device
    is_reasoning = roles == ROLE_REASONING
    is_answer = roles == ROLE_ANSWER
    reasoning_sum = segment_sum(logprobs, cu_seqlens, mask=is_reasoning)
    reasoning_len = segment_sum(torch.ones_like(logprobs), cu_seqlens, mask=is_reasoning).detach()
    index, n_comp = _per_completion_index(completion, n_seq, device)
    weights = _reference_weights(weights, index, n_comp, n_seq, device)
    first = _first_of_each(index, n_comp)
    comp_groups = (torch.arange(n_comp, device=device) // groups if isinstance(groups, int)
                   else groups.to(device)[first])
    row_seq = _row_sequence(cu_seqlens, roles.numel(), device)[is_answer]
    terms = verifree_terms(logprobs.detach()[is_answer], row_seq, index, weights, comp_groups,
                           reward_form=reward_form)
    answer_rows = logprobs[is_answer]
    sft = torch.zeros(n_comp, dtype=torch.float64, device=device).index_add(
        0, index[row_seq], terms.answer_coeffs * answer_rows.double())
    per_completion = -(terms.advantages * reasoning_sum[first].double()) + sft
    denom = num_completions_total if num_completions_total is not None else n_comp
    return VerifreeOutput(
        loss=(per_completion.sum() / denom).to(logprobs.dtype),
        rewards=terms.rewards, advantages=terms.advantages,
        reasoning_logprob=reasoning_sum[first].detach(), reasoning_len=reasoning_len[first],
        answer_len=terms.answer_len, found=terms.answer_len > 0,
    )


def _reference_weights(weights, index, n_comp, n_seq, device) -> torch.Tensor:
    if weights is None:
        copies = torch.zeros(n_comp, device=device).index_add_(0, index, torch.ones(n_seq, device=device))
        return (1.0 / copies[index]).double()
    if weights.shape != (n_seq,):
        raise ValueError(f"weights must have shape [{n_seq}], got {tuple(weights.shape)}")
    return weights.to(device=device, dtype=torch.float64)


def _row_sequence(cu_seqlens: torch.Tensor, n_rows: int, device) -> torch.Tensor:
    n_seq = cu_seqlens.numel() - 1
    return torch.repeat_interleave(torch.arange(n_seq, device=device), cu_seqlens.to(device).diff(),
                                   output_size=n_rows)


@dataclass
class VerifreeCoefficients:
    coeffs: torch.Tensor          # [T] float64: -A_i on reasoning rows (first copy), -w_k dR_ik on answer rows
    rewards: torch.Tensor         # [C] per completion
    advantages: torch.Tensor      # [C]
    found: torch.Tensor           # [C] bool: an answer was scored
    answer_len: torch.Tensor      # [C] answer tokens of the first copy


def verifree_coefficients(answer_logprobs: torch.Tensor, roles: torch.Tensor, cu_seqlens: torch.Tensor,
                          groups: torch.Tensor, *, completion: torch.Tensor | None = None,
                          weights: torch.Tensor | None = None, first_copy: torch.Tensor | None = None,
                          extra_rewards: torch.Tensor | None = None, reward_form: str = "prob"
                          ) -> VerifreeCoefficients:
    """VeriFree's gradient as per-row coefficients of the log-probs (the single pass:
    only the answer rows' log-probs are needed to know them). answer_logprobs [T]: the
    current log-probs, read on the answer rows only; roles [T], cu_seqlens [B + 1],
    groups [B], completion / weights [B] as in `verifree_loss`. `first_copy` [B] marks the
    sequence of each completion that carries its reasoning (default: the first).
    extra_rewards [C], per completion in the order of `completion`'s sorted ids, adds to
    R_i before the advantages (the trainer's `reward` verifier); `reward_form` as in
    `verifree_loss`."""
    device = answer_logprobs.device
    n_seq = cu_seqlens.numel() - 1
    is_answer = roles == ROLE_ANSWER
    index, n_comp = _per_completion_index(completion, n_seq, device)
    weights = _reference_weights(weights, index, n_comp, n_seq, device)
    first = _first_of_each(index, n_comp)
    if first_copy is None:
        first_copy = torch.zeros(n_seq, dtype=torch.bool, device=device).index_fill_(0, first, True)
    row_seq = _row_sequence(cu_seqlens, roles.numel(), device)[is_answer]
    terms = verifree_terms(answer_logprobs.double()[is_answer], row_seq, index, weights, groups.to(device)[first],
                           reward_form=reward_form, extra_rewards=extra_rewards)
    coeffs = verifree_row_coefficients(roles, cu_seqlens, terms.seq_advantage, terms.answer_coeffs, first_copy)
    return VerifreeCoefficients(coeffs, terms.rewards, terms.advantages, terms.answer_len > 0, terms.answer_len)


def verifree_row_coefficients(roles: torch.Tensor, cu_seqlens: torch.Tensor, seq_advantage: torch.Tensor,
                              answer_coeffs: torch.Tensor, first_copy: torch.Tensor) -> torch.Tensor:
    """[T] float64 coefficients: -A of the sequence's completion on the reasoning rows of
    the copy that carries a completion's reasoning (seq_advantage [B]), answer_coeffs
    [R] on the answer rows in order, 0 elsewhere."""
    device = roles.device
    row_seq = _row_sequence(cu_seqlens, roles.numel(), device)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    reasoning = torch.where(first_copy.to(device), -seq_advantage.to(device, torch.float64), zero)
    coeffs = torch.where(roles == ROLE_REASONING, reasoning[row_seq], zero)
    coeffs[roles == ROLE_ANSWER] = answer_coeffs.to(device, torch.float64)
    return coeffs


def jepo_terms(answer_logprobs: torch.Tensor, row_seq: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
               comp_groups: torch.Tensor, *, extra_rewards: torch.Tensor | None = None, normalize: bool = True,
               answer_coef: float = 1.0) -> ForwardTerms:
    """JEPO's estimator (Tang et al. 2025, arXiv 2503.19618, Eq. 7 and Appendix B.2) from
    the answer rows' log-probs, arguments as `verifree_terms`. Per group of G
    completions with p_i = sum_k w_k pi(y*_k | x, z_i), in log space:
        L = log (1/G) sum_j p_j, A_i = L - log (1/(G-1)) sum_{j != i} p_j,
    normalized as the paper's practice, clip(A_i / std_group(A), -1, 1) (`normalize`),
    the extra rewards' RLOO advantage added; the answer rows get the gradient of L,
    -answer_coef * w_k pi(y*_k | x, z_i) / sum_j p_j (a softmax over the group). A group
    of one completion has A = 0."""
    lp = answer_logprobs.double()
    n_seq, n_comp = index.numel(), comp_groups.numel()
    device = lp.device
    seq_logp = torch.zeros(n_seq, dtype=torch.float64, device=device).index_add_(0, row_seq, lp)
    length = torch.zeros(n_seq, dtype=torch.float64, device=device).index_add_(0, row_seq, torch.ones_like(lp))
    weights = weights.to(device, torch.float64)
    term = torch.where(length > 0, torch.log(weights) + seq_logp, torch.full_like(seq_logp, -math.inf))
    log_p = torch.full((n_comp,), -math.inf, dtype=torch.float64, device=device)
    for c in range(n_comp):  # a handful of references per completion
        log_p[c] = torch.logsumexp(term[index == c], 0) if bool((index == c).any()) else -math.inf
    advantages = torch.zeros(n_comp, dtype=torch.float64, device=device)
    log_total = torch.full((n_comp,), -math.inf, dtype=torch.float64, device=device)  # log sum_j p_j of its group
    bound = torch.full((n_comp,), -math.inf, dtype=torch.float64, device=device)
    for g in torch.unique(comp_groups).tolist():
        members = (comp_groups == g).nonzero().squeeze(1)
        lg = log_p[members]
        size = members.numel()
        total = torch.logsumexp(lg, 0)
        log_total[members] = total
        bound[members] = total - math.log(size)
        if size < 2:
            continue
        others = lg.expand(size, size).masked_fill(torch.eye(size, dtype=torch.bool, device=device), -math.inf)
        a = (total - math.log(size)) - (torch.logsumexp(others, 1) - math.log(size - 1))
        a = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
        if normalize and size > 2:
            std = a.std()
            a = (a / std).clamp(-1.0, 1.0) if bool(std > 0) else torch.zeros_like(a)
        advantages[members] = a
    if extra_rewards is not None:
        advantages = advantages + grouped_advantages(extra_rewards.float(), comp_groups,
                                                     estimator="rloo").to(device, torch.float64)
    share = torch.exp(term - log_total[index])  # w_k pi(y*_k | z_i) / sum_j p_j
    share = torch.where(torch.isfinite(share), share, torch.zeros_like(share))
    first = _first_of_each(index, n_comp)
    return ForwardTerms(advantages[index], -answer_coef * share[row_seq], torch.exp(log_p), advantages,
                        length[first], bound)


@dataclass
class VeriFreeConfig(ObjectiveConfig):
    loss_agg: str = option("seq_mean_token_sum", "official: the sum over a completion's tokens, averaged over "
                           "completions", choices=LOSS_AGGREGATIONS)
    reward_form: str = option("prob", "the reward of the reference after the reasoning: prob pi(y*|x,z) "
                              "(VeriFree), logprob log pi(y*|x,z), mean_logprob (per reference token) or "
                              "mean_prob (mean per-token probability, RLPR's score alone); the log forms "
                              "suit long references, whose probability vanishes", choices=REWARD_FORMS)


class VeriFree(Objective):
    name = "verifree"
    Config = VeriFreeConfig
    advantage_estimator = "rloo"

    @property
    def scores_every_completion(self) -> bool:
        """Whether a completion without the marker is scored too (the marker appended):
        the rewards finite for any reasoning (log forms)."""
        return self.config.reward_form in ("logprob", "mean_logprob")

    def estimate(self, answer_logprobs: torch.Tensor, row_seq: torch.Tensor, index: torch.Tensor,
                 weights: torch.Tensor, comp_groups: torch.Tensor, *,
                 extra_rewards: torch.Tensor | None = None) -> ForwardTerms:
        """The estimator: the answer rows' log-probs to advantages and answer coefficients."""
        return verifree_terms(answer_logprobs, row_seq, index, weights, comp_groups,
                              reward_form=self.config.reward_form, extra_rewards=extra_rewards)

    def sequences(self, samples: list[Sample]) -> TrainSequences:
        """prompt | reasoning through the marker | reference answer, one sequence per
        (completion, reference); the completion as sampled where it has no answer."""
        cfg = self.cfg
        every = self.scores_every_completion
        seqs, owner, prefix, weights, first_copy = [], [], [], [], []
        limit = self.length_limit
        for i, s in enumerate(samples):
            room = max(0, limit - len(s.prompt_ids))
            spliced, _ = splice_answers(self.tokenizer, s.ids, list(s.example.answers), marker=cfg.marker,
                                        answer_template=cfg.answer_template, every=every)
            if (s.truncated and not every) or not spliced[0].found:
                # Reward 0; the completion as sampled still gets its policy-gradient term.
                ids = s.ids[:room]
                s.over_length |= len(ids) < len(s.ids)
                seqs.append(Sequence(s.prompt_ids, ids, [], group=s.group))
                owner.append(i), prefix.append(len(ids)), weights.append(1.0), first_copy.append(True)
                continue
            for k, (sp, w) in enumerate(zip(spliced, s.example.weights)):
                reasoning, answer, cut = fit_reasoning(len(s.prompt_ids), sp.reasoning_ids, sp.answer_ids,
                                                       cfg.max_seq_len or None, every)
                s.over_length |= cut
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
        """The advantages and answer coefficients of whole groups from their answer rows'
        log-probs (a no-grad forward), kept per sequence for `coefficients`."""
        n = len(train.sequences)
        train.data.setdefault("answer_coeffs", [None] * n)
        train.data.setdefault("advantage", [None] * n)
        if not index:
            return
        owner = torch.tensor([train.owner[i] for i in index])
        completions, inverse = torch.unique(owner, return_inverse=True)
        first = _first_of_each(inverse, completions.numel())
        lengths = torch.tensor([lp.numel() for lp in looked], dtype=torch.long)
        row_seq = torch.repeat_interleave(torch.arange(len(index)), lengths)
        terms = self.estimate(torch.cat(looked).double() if looked else torch.zeros(0, dtype=torch.float64), row_seq,
                              inverse, torch.tensor([train.data["weight"][i] for i in index], dtype=torch.float64),
                              torch.tensor([train.sequences[index[j]].group for j in first.tolist()]),
                              extra_rewards=None if ctx.extra_rewards is None else ctx.extra_rewards[completions])
        for j, (i, rows) in enumerate(zip(index, terms.answer_coeffs.split(lengths.tolist()))):
            train.data["answer_coeffs"][i] = rows.tolist()
            train.data["advantage"][i] = float(terms.seq_advantage[j])
        self._add_reward_metrics(ctx, terms)

    def coefficients(self, mb: MicroBatch, looked: torch.Tensor | None, ctx: StepContext):
        batch, device = mb.batch, mb.device
        first_copy = torch.tensor(mb.data["first_copy"], device=device)
        if _scored_before(mb):
            answer = [c for rows in mb.data["answer_coeffs"] for c in rows]
            return verifree_row_coefficients(batch.roles.to(device), batch.cu_seqlens,
                                             torch.tensor(mb.data["advantage"], dtype=torch.float64),
                                             torch.tensor(answer, dtype=torch.float64), first_copy), None
        roles = batch.roles.to(device)
        is_answer = roles == ROLE_ANSWER
        index, n_comp = _per_completion_index(mb.owner.to(device), len(mb.index), device)
        first = _first_of_each(index, n_comp)
        terms = self.estimate(looked.double()[is_answer], _row_sequence(batch.cu_seqlens, roles.numel(), device)[
            is_answer], index, torch.tensor(mb.data["weight"], dtype=torch.float64, device=device),
            batch.groups.to(device)[first],
            extra_rewards=None if ctx.extra_rewards is None else ctx.extra_rewards[torch.unique(mb.owner)])
        self._add_reward_metrics(ctx, terms)
        return verifree_row_coefficients(roles, batch.cu_seqlens, terms.seq_advantage, terms.answer_coeffs,
                                         first_copy), None

    @staticmethod
    def _add_reward_metrics(ctx: StepContext, terms: ForwardTerms) -> None:
        n, m = terms.rewards.numel(), ctx.metrics
        add_metric(m, "reward_mean", terms.rewards.sum().item(), n)
        add_metric(m, "advantage_std", (terms.advantages.double() ** 2).sum().item(), n, root=True)
        add_metric(m, "rewarded_frac", (terms.answer_len > 0).sum().item(), n)
        add_metric(m, "answer_len", terms.answer_len.sum().item(), n)
        if terms.bound is not None:
            finite = torch.isfinite(terms.bound)
            add_metric(m, "jepo_bound", terms.bound[finite].sum().item(), finite.sum().item())


@dataclass
class JEPOConfig(ObjectiveConfig):
    loss_agg: str = option("seq_mean_token_sum", "the sum over a completion's tokens, averaged over completions "
                           "(the paper found per-token normalization made no difference)", choices=LOSS_AGGREGATIONS)
    jepo_normalize: bool = option(True, "the paper's practice: advantages divided by their group's std and clipped "
                                        "to [-1, 1]")
    jepo_answer_coef: float = option(1.0, "weight of the bound's gradient through the answer tokens (beta_sup: 1 "
                                          "in the paper's Numina runs, 0 to 1e-2 for MATH)", minimum=0)


class JEPO(VeriFree):
    """JEPO (docs/algorithms.md): the multi-sample Jensen lower bound
    log (1/G) sum_i pi(y* | x, z_i) of log pi(y* | x), trained with VeriFree's sequences
    and passes; every completion is scored (the marker appended where it is missing)."""

    name = "jepo"
    Config = JEPOConfig

    @property
    def scores_every_completion(self) -> bool:
        return True

    def estimate(self, answer_logprobs, row_seq, index, weights, comp_groups, *, extra_rewards=None):
        return jepo_terms(answer_logprobs, row_seq, index, weights, comp_groups, extra_rewards=extra_rewards,
                          normalize=self.config.jepo_normalize, answer_coef=self.config.jepo_answer_coef)


def _scored_before(mb: MicroBatch) -> bool:
    """Whether the separate reward pass scored this micro-batch's sequences (the trainer
    never mixes them with sequences rewarded in the gradient forward)."""
    done = [a is not None for a in mb.data.get("advantage", [None] * len(mb.index))]
    if any(done) != all(done):
        raise ValueError("a micro-batch mixes sequences scored by the separate reward pass with others")
    return all(done) and bool(done)
