"""The one interface between the trainer and a training method.

An `Objective` turns a rollout (G sampled completions per prompt) into packed training
sequences and, for every trained row of a micro-batch, the coefficient of that row's
log-prob in the loss:

    loss = sum_t c_t * log pi(target_t) + sum_t e_t * entropy_t

so the lm_head can run one fused forward+backward pass with the coefficients known
(`pyvf.ops.policy_loss`). Before that it may compute rewards without gradients
(`score`: a rule checker, RLPR's probabilities, NOVER's proxy) and, inside the
gradient forward, take a no-grad look at the current log-probs of some rows (`look`:
VeriFree's answer rows, the completion rows for a PPO ratio or a KL term).

Coefficients are returned per completion unit ("raw"): the trainer multiplies them by
the loss aggregation (`aggregation_scale`), so every objective gets
`seq_mean_token_sum`, `token_mean` and `seq_mean_token_mean` for free. The trainer
knows no method by name.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from pyvf.data.dataset import Example
from pyvf.options import option
from pyvf.packing import ROLE_REASONING, PackedBatch, Sequence, pack

if TYPE_CHECKING:
    from pyvf.train.config import TrainConfig

LOSS_AGGREGATIONS = ("seq_mean_token_sum", "token_mean", "seq_mean_token_mean")


@dataclass
class ObjectiveConfig:
    """The keys every objective has. Each objective's `Config` subclasses it with its own
    keys and the method's official defaults (docs/algorithms.md); `pyvf train` takes them
    as --key value like the common keys, and --help lists them per objective."""
    loss_agg: str = option("token_mean", "how the step's loss averages the per-token terms: over completions of "
                                         "per-completion sums (seq_mean_token_sum), over all trained tokens "
                                         "(token_mean) or over completions of per-completion means",
                           choices=LOSS_AGGREGATIONS)


@dataclass
class Sample:
    """One sampled completion of one prompt."""
    example_index: int            # index of the example in the training set
    example: Example
    prompt_ids: list[int]
    ids: list[int]                # as sampled, through the stop string or EOS that ended it
    finish: str                   # "stop", "eos" or "length"
    rollout_logprobs: list[float] | None  # the engine's log-prob of each sampled token
    group: int                    # the prompt's index within the step (global across ranks and rounds)
    answer_end: int | None = None  # when sampling went on past the answer (PCL): ids[:answer_end] is the answer part
    scored: dict = field(default_factory=dict)  # what the objective's `score` found per sample, for its later calls
    over_length: bool = False     # cut, or its reward zeroed, by an explicit max_seq_len (counted per step)
    policy_version: int | None = None  # the weights' version that sampled it (engine processes); None: the current
    engine_on_policy: bool = True  # the engine computes as the trainer does (HF); False: vLLM's numerics

    def behaviour_is_current(self, step: int) -> bool:
        """Whether the policy that sampled it is the one step `step` trains (the weights
        after step - 1, in the trainer's numerics): then no importance weight is needed."""
        return self.engine_on_policy and (self.policy_version is None or self.policy_version == step - 1)

    @property
    def truncated(self) -> bool:
        return self.finish == "length"


@dataclass
class TrainSequences:
    """What an objective trains on: packed-ready sequences and, per sequence, the sample
    it came from, how many of its leading reasoning ids are the sampled tokens, and any
    values the objective reads back in `coefficients` (`data`, one list entry per
    sequence, sliced with the micro-batches)."""
    sequences: list[Sequence]
    owner: list[int]              # index into the step's samples
    sampled_prefix: list[int]     # leading reasoning_ids that are the engine's own tokens
    data: dict[str, list] = field(default_factory=dict)

    def micro_batch(self, index: list[int], device: torch.device) -> "MicroBatch":
        """The packed micro-batch of sequences `index`, with their slices of everything above."""
        seqs = [self.sequences[i] for i in index]
        batch = pack(seqs)
        row_sequence = torch.repeat_interleave(torch.arange(len(index)), batch.cu_seqlens.diff()).to(device)
        return MicroBatch(batch, list(index), seqs, [self.sampled_prefix[i] for i in index],
                          torch.tensor([self.owner[i] for i in index], dtype=torch.long), row_sequence, device,
                          {key: [values[i] for i in index] for key, values in self.data.items()})


@dataclass
class MicroBatch:
    """A packed micro-batch handed to `Objective.look` and `Objective.coefficients`."""
    batch: PackedBatch
    index: list[int]              # indices into TrainSequences.sequences
    sequences: list[Sequence]     # the packed sequences, in order
    sampled_prefix: list[int]     # per packed sequence: leading reasoning ids that are sampled tokens
    owner: torch.Tensor           # [B] sample index of each packed sequence
    row_sequence: torch.Tensor    # [T] packed-sequence index of each row
    device: torch.device
    data: dict[str, list] = field(default_factory=dict)  # TrainSequences.data of the packed sequences


@dataclass
class StepContext:
    """What an objective may use during a step."""
    step: int
    policy: torch.nn.Module       # pyvf.runtime.policy.Policy: policy(batch, temperature) -> log-probs (no grad)
    temperature: float
    device: torch.device
    world: int = 1
    rank: int = 0
    samples: list[Sample] = field(default_factory=list)  # the step's samples (this rank's)
    rewards: torch.Tensor | None = None      # [S] per sample, from `score` (float64, CPU)
    advantages: torch.Tensor | None = None   # [S] per sample
    extra_rewards: torch.Tensor | None = None  # [S] the `reward` verifier's scores, for objectives that reward in the forward
    metrics: dict = field(default_factory=dict)  # running sums the objective adds to


class Objective:
    """Base class; subclasses live one per file in pyvf/objectives/."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[ObjectiveConfig]] = ObjectiveConfig   # the method's own keys and defaults
    advantage_estimator: ClassVar[str] = "grpo"
    advantage_eps: ClassVar[float] = 1e-6
    prompt_template: ClassVar[str] = ""         # the method's prompt when the config sets none ("" = the task's)
    needs_references: ClassVar[bool] = True     # False: trains on examples without a reference answer
    # True: `coefficients` already weights sampled tokens by pi / pi_behaviour (a PPO ratio
    # against the engine's log-probs, capped at cfg.tis_cap), so the trainer adds no weight.
    weights_sampled_tokens: ClassVar[bool] = False

    def __init__(self, cfg: "TrainConfig", tokenizer):
        self.cfg = cfg                  # the common keys (pyvf.train.config.TrainConfig)
        self.config = cfg.objective_config if isinstance(cfg.objective_config, self.Config) else self.Config()
        self.tokenizer = tokenizer

    # -- once --------------------------------------------------------------------------
    def attach(self, policy) -> None:
        """Called once with the (unsharded) policy, before a resumed state is loaded:
        build what lives beside it (NOVER's proxy copy)."""

    def setup(self, policy, examples: list[Example], prompts, device, *, rank: int = 0, world: int = 1) -> None:
        """Called once before the first step of a fresh run, with the initial policy
        (not on resume, where `load_state_dict` restores what setup computed). `prompts`
        maps an example index to its prompt token ids."""

    def after_shard(self, sharded: bool) -> None:
        """Called once after the policy is sharded (or not) across processes."""

    @property
    def length_limit(self) -> int:
        """The longest training sequence: cfg.max_seq_len, or no limit when it is 0 (the
        default: a step's sequences are then as long as the step made them)."""
        return self.cfg.max_seq_len or sys.maxsize

    def continuation_tokens(self) -> int:
        """The most tokens `continue_rollout` samples after a completion (an engine's
        longest sequence is prompt + max_new_tokens + this)."""
        return 0

    # -- per step ------------------------------------------------------------------------
    def prompt(self, question: str, template: str) -> tuple[str, str]:
        """(text, template) that `pyvf.chat.render_prompt_ids` renders for one example:
        by default the example's question in the template."""
        return question, template

    def continue_rollout(self, samples: list[Sample], engine, ctx: StepContext) -> list[Sample]:
        """More sampling after the rollout, with the same engine (PCL's self-evaluation
        after the answer); the samples to score and train on. Default: none."""
        return samples

    def score(self, samples: list[Sample], ctx: StepContext) -> torch.Tensor | None:
        """Rewards [S] (float64) computed before the gradient forward, or None when they
        come from the gradient forward itself (VeriFree)."""
        return None

    def group_filter(self):
        """An object with `keep(group_stds, step, round) -> bool mask over the round's
        groups` and `extra_rounds` (at most that many more sampling rounds refill the step;
        RLPR's reward-std filter), or None: no filtering, no extra rounds. The stds are
        those of all ranks, so every rank makes the same decision."""
        return None

    def sequences(self, samples: list[Sample]) -> TrainSequences:
        """Default: train on each completion as sampled (cut to the length limit)."""
        seqs, owner, prefix = [], [], []
        for i, s in enumerate(samples):
            room = max(0, self.length_limit - len(s.prompt_ids))
            ids = s.ids[:room]
            s.over_length |= len(ids) < len(s.ids)
            seqs.append(Sequence(s.prompt_ids, ids, [], group=s.group))
            owner.append(i)
            prefix.append(len(ids))
        return TrainSequences(seqs, owner, prefix)

    def sample_metrics(self, samples: list[Sample], ctx: StepContext) -> None:
        """Metrics of the step's samples (`add_metric`). Default: `marker_frac`, the share
        of completions that wrote the answer marker."""
        marker = self.cfg.marker
        add_metric(ctx.metrics, "marker_frac", sum(marker in self.tokenizer.decode(s.ids) for s in samples),
                   len(samples))

    def look(self, mb: MicroBatch, ctx: StepContext) -> torch.Tensor | None:
        """Bool mask [T] of rows whose current log-probs `coefficients` needs, or None."""
        return None

    def coefficients(self, mb: MicroBatch, looked: torch.Tensor | None, ctx: StepContext
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw per-row coefficients (c [T], e [T] or None) before loss aggregation.
        Default: the policy gradient -A_i on every completion row."""
        return -self.completion_advantages(mb, ctx), None

    def rewards_from_look(self, train: TrainSequences, index: list[int], looked: list[torch.Tensor],
                          ctx: StepContext) -> None:
        """The separate reward pass, for objectives whose rewards come from the gradient
        forward (`score` gives None; the trainer's reward_pass). `looked[j]` holds the
        current log-probs of the `look` rows of sequence index[j] (float64, CPU, in row
        order), from a no-grad forward; `index` covers whole groups. Computes those
        groups' rewards and keeps in `train.data` what `coefficients` needs, so their
        gradient micro-batches may hold any sequences."""
        raise NotImplementedError(f"objective {self.name!r} rewards in the gradient forward (its score gives None) "
                                  f"but has no separate reward pass: use reward_pass fused")

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs: plain values and tensors (torch.load with
        weights_only=True must read it back)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # -- helpers for subclasses ---------------------------------------------------------
    def completion_advantages(self, mb: MicroBatch, ctx: StepContext) -> torch.Tensor:
        """-(c) of the plain policy gradient: A of the row's sample on completion rows, 0 elsewhere."""
        adv = ctx.advantages.to(mb.device, torch.float64)[mb.owner.to(mb.device)][mb.row_sequence]
        return torch.where(mb.batch.roles.to(mb.device) == ROLE_REASONING, adv, torch.zeros_like(adv))


def index_in_group(samples: list[Sample]) -> list[int]:
    """Each sample's position among the samples of its group, in order: with the group
    id, a key that does not depend on the rank or on how the step is split."""
    seen: dict[int, int] = {}
    out = []
    for s in samples:
        out.append(seen.get(s.group, 0))
        seen[s.group] = out[-1] + 1
    return out


def add_metric(metrics: dict, key: str, total: float, count: float, *, root: bool = False) -> None:
    """Adds to a running (sum, count) metric of a step; the trainer sums both over
    micro-batches and ranks and reports sum / count (its square root with `root`)."""
    s, c, _ = metrics.get(key, (0.0, 0.0, root))
    metrics[key] = (s + float(total), c + float(count), root)


def aggregation_scale(mode: str, mb: MicroBatch, *, trained_rows_per_sample: torch.Tensor, n_samples: int,
                      n_trained_rows: int) -> torch.Tensor:
    """Per-row multiplier [T] that turns raw coefficients into the step's loss:
    seq_mean_token_sum: 1 / (completions in the step), token_mean: 1 / (trained rows in
    the step), seq_mean_token_mean: 1 / (completions * the row's completion's trained
    rows). Step totals are over all ranks and micro-batches."""
    device = mb.device
    t = mb.batch.input_ids.numel()
    if mode == "seq_mean_token_sum":
        return torch.full((t,), 1.0 / max(n_samples, 1), device=device)
    if mode == "token_mean":
        return torch.full((t,), 1.0 / max(n_trained_rows, 1), device=device)
    if mode == "seq_mean_token_mean":
        per_seq = trained_rows_per_sample.to(device, torch.float32)[mb.owner.to(device)].clamp(min=1)
        return (1.0 / (per_seq * max(n_samples, 1)))[mb.row_sequence]
    raise ValueError(f"loss_agg must be one of {', '.join(LOSS_AGGREGATIONS)}, got {mode!r}")


def check_1d(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor, got {type(t).__name__} "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else ''}")


def check_same_length(**tensors: torch.Tensor) -> None:
    names = list(tensors)
    for n in names:
        check_1d(n, tensors[n])
    n0 = tensors[names[0]].numel()
    for n in names[1:]:
        if tensors[n].numel() != n0:
            raise ValueError(f"{n} must have the same length as {names[0]} ({n0}), got {tensors[n].numel()}")


def group_stds(rewards: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, stds): the sorted group ids and each group's unbiased reward std (torch.std,
    as verl's `compute_grpo_outcome_advantage`). A group with a NaN reward, or of one
    completion, has std NaN (the filter drops it)."""
    check_same_length(rewards=rewards, groups=groups)
    ids, inverse = torch.unique(groups, return_inverse=True)
    r = rewards.to(torch.float64)
    n = torch.zeros(ids.numel(), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(r))
    mean = torch.zeros_like(n).index_add_(0, inverse, r) / n
    sq = torch.zeros_like(n).index_add_(0, inverse, (r - mean[inverse]) ** 2)
    std = torch.where(n > 1, torch.sqrt(sq / (n - 1).clamp(min=1)), torch.full_like(n, float("nan")))
    return ids, std


def per_token_rows(mb: MicroBatch, per_sample: list[list[float] | None]) -> torch.Tensor:
    """[T] values of the sampled completion tokens at the rows that predict them (NaN
    elsewhere): per_sample[i][t] goes to the row of token t of sample i's reasoning, for
    the first mb.sampled_prefix[b] tokens of each packed sequence b (engine log-probs,
    a reference model's log-probs)."""
    out = torch.full((mb.batch.input_ids.numel(),), float("nan"), dtype=torch.float64)
    starts = mb.batch.cu_seqlens.tolist()
    for b, (seq, n) in enumerate(zip(mb.sequences, mb.sampled_prefix)):
        values = per_sample[int(mb.owner[b])]
        if not n or values is None or not seq.prompt_ids:
            continue
        first = starts[b] + len(seq.prompt_ids) - 1  # the row that predicts the first reasoning token
        out[first:first + n] = torch.tensor(values[:n], dtype=torch.float64)
    return out.to(mb.device)
