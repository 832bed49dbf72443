"""RLPR (OpenBMB/RLPR on verl; docs/algorithms.md): the policy's mean per-token
probability of the reference after its reasoning (score B), minus the same without any
reasoning under the initial policy (score A), plus a format score; a repetition
penalty; prompts whose group reward std falls below an EMA of the stds are filtered out
and more are sampled; GRPO advantages, PPO ratio clip 0.2 / 0.27, entropy bonus 0.001,
token-mean loss.

The formulas were checked against the official code, file by file (cited in each
docstring and in tests/objectives/test_rlpr.py).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

from pyvf.objectives.base import (
    MicroBatch, Objective, ObjectiveConfig, Sample, StepContext, add_metric, check_1d, check_same_length, group_stds,
    per_token_rows,
)
from pyvf.ops import segment_sum
from pyvf.options import option
from pyvf.packing import ROLE_REASONING, Sequence
from pyvf.runtime import distributed
from pyvf.runtime.policy import score_rows
from pyvf.splice import render_answer, splice_reference

log = logging.getLogger("pyvf")


RLPR_FORMAT_WEIGHT = 0.1


def count_markers(text: str, marker: str = "<answer>") -> int:
    """Non-overlapping occurrences of `marker` in `text` (RLPR scores a completion only
    when its response text holds exactly one `<answer>`)."""
    if not marker:
        raise ValueError("marker must be a non-empty string")
    return text.count(marker)


def rlpr_format_ok(text: str, *, think: bool = True) -> bool:
    """RLPR's format score (verl/workers/reward_manager/prob.py, `format_reward`): each of
    <think>, </think>, <answer>, </answer> exactly once (only the answer tags when
    `think` is False), in that order."""
    tags = ("<think>", "</think>", "<answer>", "</answer>") if think else ("<answer>", "</answer>")
    if any(text.count(t) != 1 for t in tags):
        return False
    pattern = r"<think>.*</think>.*<answer>.*</answer>.*" if think else r".*<answer>.*</answer>.*"
    return re.fullmatch(pattern, text, re.DOTALL) is not None


def rlpr_scoreable(text: str, *, think: bool = True) -> bool:
    """Whether RLPR computes score B for a completion (ray_trainer.py,
    `replace_answer_with_gt_batch`): exactly one `<answer>` (and exactly one <think> and
    one </think> before it when `think`), followed by a non-blank answer section. The
    official code also gives B = 0 when the spliced sequence exceeds the length limit."""
    if count_markers(text, "<answer>") != 1:
        return False
    if think:
        if text.count("<think>") != 1 or text.count("</think>") != 1:
            return False
        if re.fullmatch(r"^.*<think>.*</think>.*<answer>.*$", text, re.DOTALL) is None:
            return False
    return bool(text.split("<answer>", 1)[1].strip())


def rlpr_score(logprobs: torch.Tensor, span_mask: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Mean per-token probability mean_t exp(logprob_t) over the rows of each packed
    sequence where `span_mask` is True: the tokens overlapping the reference text (tags
    and EOS excluded). 0 for a sequence without span tokens, as the official
    `compute_scoreB` gives a completion it could not splice."""
    check_same_length(logprobs=logprobs, span_mask=span_mask)
    if span_mask.dtype != torch.bool:
        raise ValueError(f"span_mask must be a bool tensor, got {span_mask.dtype}")
    lp = logprobs.detach().to(torch.float64)
    probs = segment_sum(torch.exp(lp), cu_seqlens, mask=span_mask)
    count = segment_sum(torch.ones_like(lp), cu_seqlens, mask=span_mask)
    return torch.where(count > 0, probs / count.clamp(min=1), torch.zeros_like(probs))


def rlpr_rewards(score_with_reasoning: torch.Tensor, score_without: torch.Tensor, format_ok: torch.Tensor,
                 *, weight: float = 1 - RLPR_FORMAT_WEIGHT, scoreable: torch.Tensor | None = None) -> torch.Tensor:
    """weight * max(0, B - A) + (1 - weight) * format (official: shaping "threshold_0",
    format_coefficient 0.1). B = `score_with_reasoning`, A = `score_without` (the cached
    score of the reference right after the prompt). Where `scoreable` is False (not
    exactly one answer marker, see `rlpr_scoreable`) B counts as 0."""
    check_same_length(score_with_reasoning=score_with_reasoning, score_without=score_without, format_ok=format_ok)
    b = score_with_reasoning.to(torch.float64)
    if scoreable is not None:
        check_same_length(score_with_reasoning=score_with_reasoning, scoreable=scoreable)
        b = torch.where(scoreable.bool(), b, torch.zeros_like(b))
    gain = (b - score_without.to(torch.float64)).clamp(min=0)
    return weight * gain + (1 - weight) * format_ok.to(torch.float64)


def _words(text: str) -> list[str]:
    # Official windowing: split on whitespace, then every piece on "_" (empty pieces kept).
    out: list[str] = []
    for piece in text.split():
        out.extend(piece.split("_"))
    return out


def repetition_penalty(text: str, *, window: int = 10, limit: int = 10) -> float:
    """-1.0 when some `window`-word window occurs `limit` or more times in `text`, else 0.0
    (verl/utils/reward_score/repetition.py, `detect_repetition_with_hash`, called with
    window_size=10, max_repetitions_limit=10). Words: whitespace split, each piece split
    again on "_"; windows overlap; a text of at most `window` words is never penalized.
    The text is the response decoded without special tokens."""
    if window < 1 or limit < 1:
        raise ValueError(f"window and limit must be >= 1, got {window} and {limit}")
    words = _words(text)
    if len(words) <= window:
        return 0.0
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - window + 1):
        key = tuple(words[i:i + window])
        c = counts.get(key, 0) + 1
        if c >= limit:
            return -1.0
        counts[key] = c
    return 0.0


def apply_repetition_penalty(rewards: torch.Tensor, penalties: torch.Tensor) -> torch.Tensor:
    """rewards + penalties where the reward is non-zero; a zero reward stays 0 (official:
    the penalty is added at the reward tensor's non-zero entries). Apply it both to the
    rewards whose stds feed the filter and to the training rewards."""
    check_same_length(rewards=rewards, penalties=penalties)
    r = rewards.to(torch.float64)
    return torch.where(r != 0, r + penalties.to(torch.float64), r)


class RewardStdFilter:
    """RLPR's prompt filter with its EMA threshold, step by step as the official fit loop
    (verl/trainer/ppo/ray_trainer.py, `RayPPOTrainer.fit`; recipe
    examples/RLPR/reproduce_qwen.sh: filter_ema_start_step=6, filter_start_step=11,
    filter_ema_ratio=0.99, std_filter_beta=0.5). Steps are numbered from 1.

    - Steps before `ema_start_step`: nothing recorded, nothing filtered.
    - Steps `ema_start_step` .. `filter_start_step - 1`: every group kept; the mean std of
      the step's groups is recorded.
    - First filtering step: EMA = mean of those per-step means (steps 6-10 by default).
    - Each later step: EMA <- decay * EMA + (1 - decay) * m, m = the mean std of ALL groups
      sampled in the previous step, over all its refill rounds, kept or not (NaN and inf
      stds left out; a step with none leaves the EMA unchanged).
    - A group is kept iff its std is finite and beta * EMA <= std <= max_std.

    Use per step: `begin_step(step)`, then `keep(stds)` once per sampling round with the
    stds of that round's groups gathered from all ranks (every rank calls it with the same
    tensor, so all ranks hold the same state); call `keep` again for refill rounds until
    the step has its number of kept groups. `state_dict`/`load_state_dict` resume exactly.
    """

    def __init__(self, beta: float = 0.5, decay: float = 0.99, *, ema_start_step: int = 6,
                 filter_start_step: int = 11, max_std: float = 1e6):
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if not 1 <= ema_start_step <= filter_start_step:
            raise ValueError(f"need 1 <= ema_start_step <= filter_start_step, got {ema_start_step} and "
                             f"{filter_start_step}")
        self.beta, self.decay, self.max_std = beta, decay, max_std
        self.ema_start_step, self.filter_start_step = ema_start_step, filter_start_step
        self.ema: float | None = None
        self.step = 0
        self._warmup_means: list[float] = []   # per-step mean stds before the first filtering step
        self._last_mean: float | None = None   # mean std of the last finished step (>= filter start)
        self._last_mean_step = 0
        self._current: list[float] = []        # finite stds recorded in the current step

    @property
    def filtering(self) -> bool:
        return self.step >= self.filter_start_step and self.ema is not None

    @property
    def threshold(self) -> float | None:
        """beta * EMA in a filtering step, else None (no filtering)."""
        return self.beta * self.ema if self.filtering else None

    def _close_step(self) -> None:
        if self.step >= self.ema_start_step and self._current:
            mean = sum(self._current) / len(self._current)
            if self.step < self.filter_start_step:
                self._warmup_means.append(mean)
            else:
                self._last_mean, self._last_mean_step = mean, self.step
        self._current = []

    def begin_step(self, step: int) -> None:
        """Close the previous step and set this step's threshold (call once per step,
        with increasing step numbers)."""
        if step <= self.step:
            raise ValueError(f"step must increase, got {step} after {self.step}")
        self._close_step()
        self.step = step
        if step < self.filter_start_step:
            return
        if self.ema is None:
            if self._warmup_means:
                self.ema = sum(self._warmup_means) / len(self._warmup_means)
        elif self._last_mean is not None and self._last_mean_step == step - 1:
            self.ema = self.decay * self.ema + (1 - self.decay) * self._last_mean

    def keep(self, stds: torch.Tensor) -> torch.Tensor:
        """Bool mask over the groups of one sampling round; records their stds."""
        check_1d("stds", stds)
        if self.step == 0:
            raise ValueError("call begin_step(step) before keep()")
        s = stds.detach().to(torch.float64).cpu()
        finite = torch.isfinite(s)
        if self.step >= self.ema_start_step:
            self._current.extend(s[finite].tolist())
        threshold = self.threshold
        if threshold is None:
            return torch.ones(s.shape, dtype=torch.bool)
        return finite & (s >= threshold) & (s <= self.max_std)

    def __call__(self, rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Convenience for one round: bool mask over completions, True for the members of
        kept groups (stds from `group_stds`)."""
        ids, stds = group_stds(rewards, groups)
        keep_group = self.keep(stds)
        _, inverse = torch.unique(groups, return_inverse=True)
        return keep_group[inverse]

    def state_dict(self) -> dict:
        return {"beta": self.beta, "decay": self.decay, "max_std": self.max_std,
                "ema_start_step": self.ema_start_step, "filter_start_step": self.filter_start_step,
                "ema": self.ema, "step": self.step, "warmup_means": list(self._warmup_means),
                "last_mean": self._last_mean, "last_mean_step": self._last_mean_step,
                "current": list(self._current)}

    def load_state_dict(self, state: dict) -> None:
        missing = {"beta", "decay", "ema", "step", "warmup_means", "last_mean", "last_mean_step", "current"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        self.beta, self.decay, self.ema, self.step = state["beta"], state["decay"], state["ema"], state["step"]
        self.max_std = state.get("max_std", self.max_std)
        self.ema_start_step = state.get("ema_start_step", self.ema_start_step)
        self.filter_start_step = state.get("filter_start_step", self.filter_start_step)
        self._warmup_means = list(state["warmup_means"])
        self._last_mean, self._last_mean_step = state["last_mean"], state["last_mean_step"]
        self._current = list(state["current"])


# The official score-A rendering: the reference right after the prompt, between spaces.
SCORE_A_TEMPLATE = " {ref} "


def _span_scores(logprobs: list[torch.Tensor], offsets: list[int], spans: list[slice]) -> torch.Tensor:
    """rlpr_score of each sequence's reference span, its answer tokens starting at offsets[i]."""
    rows = [lp[o + sp.start:o + sp.stop] for lp, o, sp in zip(logprobs, offsets, spans)]
    cu = torch.tensor([0] + [len(r) for r in rows]).cumsum(0)
    flat = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.float64)
    return rlpr_score(flat, torch.ones(flat.numel(), dtype=torch.bool), cu)


@dataclass
class RLPRConfig(ObjectiveConfig):
    clip_low: float = option(0.2, "PPO ratio clip below 1 (official 0.2)", minimum=0)
    clip_high: float = option(0.27, "PPO ratio clip above 1 (official 0.27, clip-higher)", minimum=0)
    entropy_coeff: float = option(0.001, "entropy bonus per token (official 0.001)", minimum=0)
    filter_beta: float = option(0.5, "keep a group iff its reward std >= filter_beta * the EMA of stds", minimum=0)
    filter_rounds: int = option(4, "extra sampling rounds at most to refill the groups the filter dropped", minimum=0)


class RLPR(Objective):
    name = "rlpr"
    Config = RLPRConfig
    advantage_estimator = "grpo"

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.filter = RewardStdFilter(beta=self.config.filter_beta)
        self.score_a: torch.Tensor | None = None   # [examples, references]: score A, from the initial policy
        self.clip_low = self.config.clip_low
        self.clip_high = self.config.clip_high
        self.entropy_coeff = self.config.entropy_coeff
        self.extra_rounds = self.config.filter_rounds  # the trainer's refill budget for this filter
        # Think tags are part of the format only when the prompt asks for them.
        self.think = "<think>" in (cfg.prompt_template + cfg.assistant_prefix + cfg.system_prompt)

    def setup(self, policy, examples, prompts, device, *, rank=0, world=1):
        """Score A for every (example, reference) once, with the initial policy, before
        any update (official: `get_scoreA` at the start of `fit`); ranks split the work."""
        n_refs = max(len(ex.answers) for ex in examples)
        scores = torch.zeros(len(examples), n_refs, dtype=torch.float64)
        items = [(i, k) for i in range(rank, len(examples), world) for k in range(len(examples[i].answers))]
        seqs, spans = [], []
        for i, k in items:
            answer_ids, span = render_answer(self.tokenizer, SCORE_A_TEMPLATE, examples[i].answers[k])
            seqs.append(Sequence(prompts[i], [], answer_ids, group=0))
            spans.append(span)
        if rank == 0:
            log.info("rlpr: scoring %d references without reasoning (score A, initial policy)", len(items) * world)
        logprobs = score_rows(policy, seqs, self.cfg.micro_batch_tokens, temperature=self.cfg.temperature,
                              device=device)
        values = _span_scores(logprobs, [0] * len(seqs), spans)
        for (i, k), v in zip(items, values.tolist()):
            scores[i, k] = v
        self.score_a = distributed.all_sum_tensor(scores, device)

    def group_filter(self):
        return self

    # The filter protocol the trainer drives: keep() once per sampling round of a step.
    def keep(self, stds: torch.Tensor, step: int, round_: int) -> torch.Tensor:
        if round_ == 0:
            self.filter.begin_step(step)
        return self.filter.keep(stds)

    def score(self, samples: list[Sample], ctx: StepContext) -> torch.Tensor:
        cfg, tok = self.cfg, self.tokenizer
        texts = [cfg.assistant_prefix + tok.decode(s.ids, skip_special_tokens=True) for s in samples]
        format_ok = torch.tensor([rlpr_format_ok(t, think=self.think) for t in texts], dtype=torch.float64)
        scoreable = [rlpr_scoreable(t, think=self.think) for t in texts]
        seqs, spans, offsets, owner, refs = [], [], [], [], []
        for i, s in enumerate(samples):
            if not scoreable[i]:
                continue
            spliced = splice_reference(tok, s.ids, list(s.example.answers), marker=cfg.marker,
                                       answer_template=cfg.answer_template)
            for k, sp in enumerate(spliced):
                if not sp.found:
                    continue
                if len(s.prompt_ids) + len(sp.reasoning_ids) + len(sp.answer_ids) > self.length_limit:
                    s.over_length = True
                    continue  # B = 0 over the length limit, as the official code
                seqs.append(Sequence(s.prompt_ids, sp.reasoning_ids, sp.answer_ids, group=s.group))
                spans.append(sp.reference_span)
                offsets.append(len(sp.reasoning_ids))
                owner.append(i)
                refs.append(k)
        b = torch.zeros(len(samples), max(len(s.example.answers) for s in samples) if samples else 1,
                        dtype=torch.float64)
        values = _span_scores(score_rows(ctx.policy, seqs, cfg.micro_batch_tokens, temperature=ctx.temperature,
                                             device=ctx.device), offsets, spans)
        for i, k, v in zip(owner, refs, values.tolist()):
            b[i, k] = v
        rewards = torch.zeros(len(samples), dtype=torch.float64)
        for i, s in enumerate(samples):
            k = len(s.example.answers)
            per_ref = rlpr_rewards(b[i, :k], self.score_a[s.example_index, :k], format_ok[i].expand(k),
                                   scoreable=torch.tensor([scoreable[i]] * k))
            rewards[i] = (torch.tensor(s.example.weights, dtype=torch.float64) * per_ref).sum()
        penalties = torch.tensor([repetition_penalty(t) for t in texts], dtype=torch.float64)
        add_metric(ctx.metrics, "format_frac", float(format_ok.sum()), len(samples))
        add_metric(ctx.metrics, "repetition_frac", float((penalties < 0).sum()), len(samples))
        return apply_repetition_penalty(rewards, penalties)

    weights_sampled_tokens = True  # the PPO ratio against the engine's log-probs

    def look(self, mb: MicroBatch, ctx: StepContext):
        return mb.batch.roles.to(mb.device) == ROLE_REASONING if (self.clip_low or self.clip_high) else None

    def coefficients(self, mb: MicroBatch, looked, ctx: StepContext):
        """d/dlogp of -min(r A, clip(r, 1 - low, 1 + high) A), r = exp(logp - logp_rollout):
        -r A where the clip is inactive, 0 where it is; minus the entropy bonus."""
        adv = self.completion_advantages(mb, ctx)
        completion = mb.batch.roles.to(mb.device) == ROLE_REASONING
        coeffs = -adv
        if looked is not None:
            old = per_token_rows(mb, [s.rollout_logprobs for s in ctx.samples])
            ratio = torch.where(torch.isnan(old), torch.ones_like(old), torch.exp(looked.double() - old))
            clipped = ((adv > 0) & (ratio > 1 + self.clip_high)) | ((adv < 0) & (ratio < 1 - self.clip_low))
            # Under policy lag the engine's log-probs are the behaviour policy's; the ratio is
            # then also the importance weight, truncated like the trainer's (tis_cap).
            weight = ratio.clamp(max=self.cfg.tis_cap) if self.cfg.tis_cap else ratio
            coeffs = torch.where(clipped, torch.zeros_like(adv), -adv * weight)
            add_metric(ctx.metrics, "clip_frac", float((clipped & completion).sum()), float(completion.sum()))
        entropy = None
        if self.entropy_coeff:
            entropy = torch.where(completion, torch.full_like(adv, -self.entropy_coeff), torch.zeros_like(adv))
        return coeffs, entropy

    def state_dict(self) -> dict:
        return {"score_a": self.score_a, "filter": self.filter.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "score_a" not in state:
            raise ValueError("the checkpoint has no RLPR state (score A): was it written by another objective?")
        self.score_a = state["score_a"]
        self.filter.load_state_dict(state["filter"])
