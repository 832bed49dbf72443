"""Rewards of the objectives other than VeriFree, computed from a rollout before the
gradient forward (DESIGN.md 1.3, 1.4, 1.7). The trainer then turns them into GRPO
advantages and a policy-gradient loss on the sampled completions
(`policy_gradient_loss`). VeriFree itself is `pyvf.losses.verifree_loss`, whose
reward comes from the gradient forward.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from pyvf.ops import segment_sum
from pyvf.packing import ROLE_ANSWER, ROLE_REASONING, Sequence, pack
from pyvf.rewards import RewardStdFilter, nover_perplexity, nover_rewards, rlpr_rewards, rlpr_score, verifier_rewards


@dataclass
class Sampled:
    """One sampled completion with what every objective needs to score it."""
    prompt_ids: list[int]
    ids: list[int]
    truncated: bool
    spliced: list            # pyvf.splice.Spliced, one per reference
    answers: tuple[str, ...]
    weights: tuple[float, ...]
    group: int
    logprobs: list[float] | None = None  # rollout log-prob of each sampled token


def policy_gradient_loss(logprobs: torch.Tensor, roles: torch.Tensor, cu_seqlens: torch.Tensor,
                         advantages: torch.Tensor, num_completions_total: int) -> torch.Tensor:
    """-(1/C) sum_i A_i * sum of the log-probs of completion i's tokens. One optimizer step
    per rollout on fresh samples, so PPO's ratio is 1 at the update and its clipped
    objective has this gradient."""
    seq_logprob = segment_sum(logprobs, cu_seqlens, mask=roles == ROLE_REASONING)
    return -(advantages.to(seq_logprob.dtype) * seq_logprob).sum() / num_completions_total


def ppo_clip_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, roles: torch.Tensor,
                  cu_seqlens: torch.Tensor, advantages: torch.Tensor, num_completions_total: int, *,
                  clip_low: float = 0.2, clip_high: float = 0.27) -> torch.Tensor:
    """PPO's clipped surrogate on the completion tokens (RLPR's setting: ratio against
    the rollout log-probs, clipped to [1 - clip_low, 1 + clip_high]), summed per
    completion and averaged over completions like `policy_gradient_loss`."""
    seg = torch.repeat_interleave(torch.arange(cu_seqlens.numel() - 1, device=logprobs.device), cu_seqlens.diff(),
                                  output_size=logprobs.numel())
    adv = advantages.to(logprobs.dtype)[seg]
    ratio = torch.exp(logprobs - old_logprobs)
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv)
    mask = roles == ROLE_REASONING
    return -(surrogate * mask).sum() / num_completions_total


@torch.no_grad()
def _score(policy, sequences: list[Sequence], temperature: float) -> tuple[torch.Tensor, "object"]:
    batch = pack(sequences)
    return policy(batch, temperature), batch


def _span_positions(batch, sequences: list[Sequence], spans: list[slice]) -> torch.Tensor:
    """Mask over the packed rows whose target is a reference-span token of the answer."""
    mask = torch.zeros(batch.input_ids.numel(), dtype=torch.bool)
    answer_rows = (batch.roles == ROLE_ANSWER).nonzero().squeeze(1).tolist()
    k = 0
    for seq, span in zip(sequences, spans):
        rows = answer_rows[k:k + len(seq.answer_ids)]
        for j in range(span.start, span.stop):
            mask[rows[j]] = True
        k += len(seq.answer_ids)
    return mask


class VerifierObjective:
    """R1-Zero style: 1 when the last \\boxed{} matches a reference (1.7)."""

    def __init__(self, tokenizer, **_):
        self.tokenizer = tokenizer

    def rewards(self, samples: list[Sampled], policy, temperature: float, step: int) -> torch.Tensor:
        texts = [self.tokenizer.decode(s.ids, skip_special_tokens=True) for s in samples]
        return verifier_rewards(texts, [list(s.answers) for s in samples])

    def keep(self, rewards, groups):
        return torch.ones_like(rewards, dtype=torch.bool)


def _spliced_sequences(samples: list[Sampled]) -> tuple[list[Sequence], list[int], list[float], list[slice]]:
    """Scoring sequences [prompt | reasoning | answer], one per (valid completion, reference)."""
    seqs, owner, weights, spans = [], [], [], []
    for i, s in enumerate(samples):
        if s.truncated or not s.spliced[0].found:
            continue
        for sp, w in zip(s.spliced, s.weights):
            seqs.append(Sequence(s.prompt_ids, sp.reasoning_ids, sp.answer_ids, group=s.group))
            owner.append(i)
            weights.append(w)
            spans.append(sp.reference_span)
    return seqs, owner, weights, spans


class RlprObjective:
    """RLPR (1.3): reference-span probability gain over the no-reasoning score; PPO's
    clipped loss against the rollout log-probs."""

    clipped = True

    def __init__(self, tokenizer, **_):
        self.tokenizer = tokenizer
        self.no_reasoning_cache: dict[tuple, float] = {}
        self.filter = RewardStdFilter(ratio=0.5, decay=0.99)

    def _scores(self, policy, seqs, spans, temperature) -> torch.Tensor:
        logprobs, batch = _score(policy, seqs, temperature)
        mask = _span_positions(batch, seqs, spans).to(logprobs.device)
        return rlpr_score(logprobs, mask, batch.cu_seqlens.to(logprobs.device)).cpu().double()

    def rewards(self, samples, policy, temperature, step):
        seqs, owner, weights, spans = _spliced_sequences(samples)
        out = torch.zeros(len(samples), dtype=torch.float64)
        if seqs:
            with_reasoning = self._scores(policy, seqs, spans, temperature)
            keys = [(tuple(q.prompt_ids), tuple(q.answer_ids)) for q in seqs]
            missing = [j for j, key in enumerate(keys) if key not in self.no_reasoning_cache]
            if missing:
                bare = [Sequence(seqs[j].prompt_ids, [], seqs[j].answer_ids, group=0) for j in missing]
                scores = self._scores(policy, bare, [spans[j] for j in missing], temperature)
                for j, sc in zip(missing, scores.tolist()):
                    self.no_reasoning_cache[keys[j]] = sc
            without = torch.tensor([self.no_reasoning_cache[key] for key in keys], dtype=torch.float64)
            # Scored sequences exist only for well-formatted completions: format score 1.
            per_ref = rlpr_rewards(with_reasoning, without, torch.ones_like(without))
            out.index_add_(0, torch.tensor(owner), torch.tensor(weights, dtype=torch.float64) * per_ref)
        return out

    def keep(self, rewards, groups):
        return self.filter(rewards, groups)


class NoverObjective:
    """NOVER (1.4): a proxy model's length-normalized reference perplexity, ranked."""

    def __init__(self, tokenizer, policy=None, sync_every: int = 10, **_):
        self.tokenizer = tokenizer
        self.proxy = copy.deepcopy(policy)
        self.proxy.eval()
        self.sync_every = sync_every

    def rewards(self, samples, policy, temperature, step):
        if step > 1 and (step - 1) % self.sync_every == 0:
            with torch.no_grad():
                for p_proxy, p_policy in zip(self.proxy.parameters(), policy.parameters()):
                    p_proxy.mul_(0.9).add_(p_policy.detach(), alpha=0.1)
        seqs, owner, weights, spans = _spliced_sequences(samples)
        valid = torch.zeros(len(samples), dtype=torch.bool)
        perplexity = torch.full((len(samples),), float("inf"), dtype=torch.float64)
        if seqs:
            logprobs, batch = _score(self.proxy, seqs, temperature)
            cu = batch.cu_seqlens.to(logprobs.device)
            mask = _span_positions(batch, seqs, spans).to(logprobs.device)
            nll = -segment_sum(logprobs, cu, mask=mask)
            count = segment_sum(torch.ones_like(logprobs), cu, mask=mask).clamp(min=1)
            reasoning_len = torch.tensor([len(q.reasoning_ids) for q in seqs])
            ppl = nover_perplexity((nll / count).cpu(), reasoning_len)
            weighted = torch.zeros(len(samples), dtype=torch.float64).index_add_(
                0, torch.tensor(owner), torch.tensor(weights, dtype=torch.float64) * ppl)
            for i in set(owner):
                valid[i] = True
                perplexity[i] = weighted[i]
        lengths = torch.tensor([len(s.spliced[0].reasoning_ids) for s in samples])
        groups = torch.tensor([s.group for s in samples])
        return nover_rewards(perplexity, lengths, valid, groups)

    def keep(self, rewards, groups):
        return torch.ones_like(rewards, dtype=torch.bool)


OBJECTIVES = {"verifier": VerifierObjective, "rlpr": RlprObjective, "nover": NoverObjective}

__all__ = ["OBJECTIVES", "Sampled", "policy_gradient_loss", "ppo_clip_loss"]
