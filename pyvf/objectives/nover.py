"""NOVER (thinkwee/NOVER on TRL 0.16; docs/algorithms.md): a proxy model (a copy of the
policy, moved toward it every proxy_sync_every steps) scores the perplexity of the
reference answer block after each reasoning, normalized by the reasoning's length;
well-formatted completions are ranked within their group (reasoning reward) and
rewarded for being both shorter and better than others (efficiency reward); GRPO
advantages (eps 1e-4), k3 KL to the proxy (beta 0.1), token-mean loss.

The formulas were checked against the official code (cited in each docstring and in
tests/objectives/test_nover.py).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch

from pyvf.objectives.base import (
    MicroBatch, Objective, ObjectiveConfig, Sample, StepContext, add_metric, check_same_length, per_token_rows,
)
from pyvf.options import option
from pyvf.packing import ROLE_REASONING, Sequence
from pyvf.runtime import distributed
from pyvf.runtime.model import load_weights
from pyvf.runtime.policy import Policy, score_rows
from pyvf.splice import splice_reference


def nover_answer_block(reference: str, *, tag: str = "answer") -> str:
    """The text whose tokens NOVER's perplexity covers (utils.py, `calculate_perplexity`,
    use_tagged_format): "\\n<answer>\\n{reference}\\n</answer>", no EOS after it. In the
    official sequence it follows "...\\n<think>\\n{reasoning}\\n</think>\\n"."""
    return f"\n<{tag}>\n{reference}\n</{tag}>"


def nover_length_norm(reasoning_len: torch.Tensor) -> torch.Tensor:
    """N(|t|) = max(1, 1 + log10 |t|); |t| = 0 gives 1 (official: np.log10(0) = -inf)."""
    n = reasoning_len.to(torch.float64)
    return torch.clamp(1 + torch.log10(n), min=1.0).nan_to_num(1.0)


def nover_perplexity(nll_mean: torch.Tensor, reasoning_len: torch.Tensor) -> torch.Tensor:
    """exp(NLL_mean / N(|t|)): NLL_mean the mean negative log-likelihood of the answer
    block's tokens (`nover_answer_block`) under the proxy, |t| the reasoning's token count
    (official: the stripped think text tokenized on its own)."""
    check_same_length(nll_mean=nll_mean, reasoning_len=reasoning_len)
    return torch.exp(nll_mean.to(torch.float64) / nover_length_norm(reasoning_len))


def nover_rewards(perplexity: torch.Tensor, reasoning_len: torch.Tensor, valid: torch.Tensor,
                  groups: torch.Tensor, *, weights: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """Total = w_f R_f + w_r R_r + w_e R_e (reward_functions.py: `tag_format_reward`,
    `reasoning_reward`, `efficiency_reward`; TRL sums them with reward_weights 1/1/1),
    per group, among the valid (perfectly formatted) completions; invalid ones get 0:
      R_f = 1 for a valid completion, else 0;
      R_r = (n_valid - rank_i) / n_valid, rank_i the position of P_i in a stable ascending
            sort (equal perplexities ranked by completion order);
      R_e = #{j valid, j != i: |t_i| < |t_j| and P_i < P_j} / (n_valid - 1), all 0 when
            n_valid < 2."""
    check_same_length(perplexity=perplexity, reasoning_len=reasoning_len, valid=valid, groups=groups)
    w_f, w_r, w_e = weights
    out = torch.zeros(perplexity.shape, dtype=torch.float64)
    valid = valid.bool()
    for g in torch.unique(groups).tolist():
        members = ((groups == g) & valid).nonzero().squeeze(1).tolist()
        n = len(members)
        ppl = [float(perplexity[i]) for i in members]
        length = [float(reasoning_len[i]) for i in members]
        order = sorted(range(n), key=lambda k: ppl[k])  # Python's sort is stable
        for rank, k in enumerate(order):
            out[members[k]] += w_f + w_r * (n - rank) / n
        if n >= 2:
            for k in range(n):
                better = sum(1 for m in range(n) if m != k and length[k] < length[m] and ppl[k] < ppl[m])
                out[members[k]] += w_e * better / (n - 1)
    return out


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 (TRL 0.16
    GRPO `compute_loss`, as NOVER's trainer.py copies it; verl's "low_var_kl" is the same
    value clamped to [-10, 10]). Differentiable in `logprobs`; see `k3_kl_grad`."""
    d = ref_logprobs.detach() - logprobs
    return torch.exp(d) - d - 1


def k3_kl_grad(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """d k3_kl / d logprobs = 1 - exp(ref - logp): the per-token coefficient to add (times
    beta and the loss-aggregation weight) to a policy-gradient coefficient."""
    return 1 - torch.exp(ref_logprobs.detach() - logprobs.detach())


def nover_valid(text: str, *, think: bool = False) -> bool:
    """NOVER's format check (reward_functions.py, `tag_format_reward`): the completion,
    stripped, is exactly `<think>R</think><answer>A</answer>`, each tag once (without
    the think part when the prompt does not ask for it: then anything before the answer)."""
    body = text.strip()
    tags = ("<answer>", "</answer>") + (("<think>", "</think>") if think else ())
    if any(body.count(t) != 1 for t in tags):
        return False
    pattern = r"<think>.*</think>\s*<answer>.*</answer>" if think else r".*<answer>.*</answer>"
    return re.fullmatch(pattern, body, re.DOTALL) is not None


@dataclass
class NOVERConfig(ObjectiveConfig):
    kl_beta: float = option(0.1, "k3 KL to the proxy, NOVER's reference model (official 0.1)", minimum=0)
    proxy_sync_every: int = option(100, "proxy <- alpha proxy + (1 - alpha) policy every N steps (official 100)",
                                   minimum=1)
    proxy_alpha: float = option(0.9, "alpha of the proxy's update (official 0.9)", minimum=0, maximum=1)


class NOVER(Objective):
    name = "nover"
    Config = NOVERConfig
    advantage_estimator = "grpo"
    advantage_eps = 1e-4

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.kl_beta = self.config.kl_beta
        self.think = "<think>" in (cfg.prompt_template + cfg.assistant_prefix + cfg.system_prompt)
        self.proxy = None
        self.sharded = False

    def attach(self, policy) -> None:
        self.proxy = Policy(copy.deepcopy(policy.model), backend=policy.backend, lm_head_pass="autograd")
        self.proxy.requires_grad_(False)
        self.proxy.eval()

    def after_shard(self, sharded: bool) -> None:
        self.sharded = sharded
        if sharded:
            distributed.shard(self.proxy)

    @torch.no_grad()
    def _sync_proxy(self, policy) -> None:
        """proxy <- alpha proxy + (1 - alpha) policy (official: every 100 steps, alpha 0.9)."""
        alpha = self.config.proxy_alpha
        for p_proxy, p_policy in zip(self.proxy.parameters(), policy.parameters()):
            p_proxy.mul_(alpha).add_(p_policy.detach(), alpha=1 - alpha)

    def score(self, samples: list[Sample], ctx: StepContext) -> torch.Tensor:
        cfg, tok = self.cfg, self.tokenizer
        if ctx.step > 1 and (ctx.step - 1) % self.config.proxy_sync_every == 0:
            self._sync_proxy(ctx.policy)
        texts = [cfg.assistant_prefix + tok.decode(s.ids, skip_special_tokens=True) for s in samples]
        valid = torch.tensor([not s.truncated and nover_valid(t, think=self.think) for s, t in zip(samples, texts)])
        seqs, owner, weights, reasoning_len = [], [], [], []
        for i, s in enumerate(samples):
            if not valid[i]:
                continue
            # The whole answer block (marker, reference, closing tag) is scored: cut before the marker.
            spliced = splice_reference(tok, s.ids, list(s.example.answers), marker=cfg.marker,
                                       answer_template=cfg.answer_template, include_marker=False)
            for sp, w in zip(spliced, s.example.weights):
                seqs.append(Sequence(s.prompt_ids, sp.reasoning_ids, sp.answer_ids, group=s.group))
                owner.append(i)
                weights.append(w)
                reasoning_len.append(len(sp.reasoning_ids))
        # The official perplexity runs the proxy at temperature 1.
        logprobs = score_rows(self.proxy, seqs, cfg.micro_batch_tokens, temperature=1.0, device=ctx.device)
        nll = torch.tensor([-float(lp[r:].mean()) for lp, r in zip(logprobs, reasoning_len)], dtype=torch.float64)
        ppl = nover_perplexity(nll, torch.tensor(reasoning_len, dtype=torch.float64)) if seqs else nll
        perplexity = torch.full((len(samples),), float("inf"), dtype=torch.float64)
        if seqs:
            perplexity[sorted(set(owner))] = 0.0
            perplexity.index_add_(0, torch.tensor(owner), torch.tensor(weights, dtype=torch.float64) * ppl)
        lengths = torch.zeros(len(samples))
        for i, r in zip(owner, reasoning_len):
            lengths[i] = r
        groups = torch.tensor([s.group for s in samples])
        rewards = nover_rewards(perplexity, lengths, valid, groups)
        add_metric(ctx.metrics, "format_frac", float(valid.sum()), len(samples))
        if seqs:
            add_metric(ctx.metrics, "proxy_perplexity", float(ppl.sum()), len(seqs))
        if self.kl_beta:
            # The proxy is the KL reference: its log-probs of the completions as trained.
            room = [max(0, self.length_limit - len(s.prompt_ids)) for s in samples]
            completions = [Sequence(s.prompt_ids, s.ids[:r], [], group=s.group) for s, r in zip(samples, room)]
            ref = score_rows(self.proxy, completions, cfg.micro_batch_tokens, temperature=ctx.temperature,
                             device=ctx.device)
            for s, lp in zip(samples, ref):
                s.scored["reference_logprobs"] = lp.tolist()
        return rewards

    def look(self, mb: MicroBatch, ctx: StepContext):
        return mb.batch.roles.to(mb.device) == ROLE_REASONING if self.kl_beta else None

    def coefficients(self, mb: MicroBatch, looked, ctx: StepContext):
        """-A + beta * d k3/d logp on every completion row."""
        coeffs = -self.completion_advantages(mb, ctx)
        if looked is not None:
            ref = per_token_rows(mb, [s.scored.get("reference_logprobs") for s in ctx.samples])
            completion = ~torch.isnan(ref)
            grad = torch.where(completion, k3_kl_grad(looked.double(), torch.nan_to_num(ref)), torch.zeros_like(ref))
            coeffs = coeffs + self.kl_beta * grad
            kl = torch.where(completion, k3_kl(looked.double(), torch.nan_to_num(ref)), torch.zeros_like(ref))
            add_metric(ctx.metrics, "kl", float(kl.sum()), float(completion.sum()))
        return coeffs, None

    def state_dict(self) -> dict:
        return {"proxy": distributed.full_model_state(self.proxy, self.sharded)}

    def load_state_dict(self, state: dict) -> None:
        if "proxy" not in state:
            raise ValueError("the checkpoint has no NOVER state (proxy weights): was it written by another objective?")
        load_weights(self.proxy.model, state["proxy"])
