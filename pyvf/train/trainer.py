"""The training loop, top to bottom:
    rollout (G samples per prompt, one batched engine call) -> the objective's rewards
    (no grad, when it has them before the forward) -> its group filter (more prompts
    until the step is full) -> its training sequences -> micro-batches (`plan_step`;
    rewards from the forward: whole groups, or first the separate no-grad reward pass)
    -> one decoder forward per micro-batch -> the objective's no-grad look and its
    per-token coefficients -> the fused lm_head pass (`policy_loss`) -> backward ->
    grad-norm clip -> AdamW -> weights to the engine -> metrics, checkpoint.

One optimizer step per rollout batch, on-policy. The objective (pyvf/objectives/, one
file per method) decides everything method-specific; nothing here names a method.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from pyvf._native import flush_subnormals
from pyvf.chat import check_vocabulary, describe, render_prompt_ids, stop_token_ids
from pyvf.data import dataset
from pyvf.objectives import get_objective
from pyvf.objectives.base import (
    MicroBatch, Objective, Sample, StepContext, TrainSequences, add_metric, aggregation_scale, group_stds,
    per_token_rows,
)
from pyvf.ops import grouped_advantages
from pyvf.packing import Sequence, pack, plan_micro_batches
from pyvf.runtime import checkpoint, distributed
from pyvf.runtime.evaluation import check_references, evaluate_examples, metric_names
from pyvf.runtime.metrics import MetricsLog, plot
from pyvf.runtime.model import enable_activation_checkpointing, load_model_and_tokenizer, load_weights
from pyvf.runtime.policy import Policy
from pyvf.runtime.preemption import PreemptionGuard
from pyvf.runtime.rollout import HFGenerate
from pyvf.runtime.rollout.remote import (
    EngineProcesses, EngineSpec, WeightLayout, cpu_cores, serve_engine_rank, spec_threads,
)
from pyvf.train.config import ConfigError, TrainConfig
from pyvf.train.rollouts import AheadRollouts, rollout
from pyvf.verify import get_verifier

log = logging.getLogger("pyvf")


class DataOrder:
    """A fresh permutation of the examples each epoch, from the seed: position p of the
    stream is example perm(p // n)[p % n], so a resumed run continues exactly."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._cache: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._cache[epoch]

    def take(self, position: int, k: int) -> list[int]:
        return [self._perm(p // self.n)[p % self.n] for p in range(position, position + k)]


class Prompts:
    """Prompt token ids per example, rendered once (chat template when the tokenizer has
    one and chat_template is auto), with the config's prompt template, else the
    objective's, else the task's; the objective decides what fills the template
    (`Objective.prompt`)."""

    def __init__(self, cfg: TrainConfig, tokenizer, examples, objective: Objective | None = None):
        template = cfg.prompt_template or (objective.prompt_template if objective is not None else "")
        fill_in = objective.prompt if objective is not None else lambda question, template: (question, template)

        def render(example) -> list[int]:
            if example.messages:  # a data set's chat prompt, as given
                return render_prompt_ids(tokenizer, example.question, messages=example.messages,
                                         chat_template=cfg.chat_template, system_prompt=cfg.system_prompt,
                                         assistant_prefix=cfg.assistant_prefix)
            text, fill = fill_in(example.question, template)
            return render_prompt_ids(tokenizer, text, template=fill, chat_template=cfg.chat_template,
                                     system_prompt=cfg.system_prompt, assistant_prefix=cfg.assistant_prefix)

        self.render = render
        self.examples = examples
        self._ids: dict[int, list[int]] = {}

    def __getitem__(self, index: int) -> list[int]:
        if index not in self._ids:
            self._ids[index] = self.render(self.examples[index])
        return self._ids[index]


class StepTimer:
    """Seconds per phase of a step (rollout, scoring, reward_pass, forward_backward, optimizer,
    weight_sync)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0


def collect(cfg, engine, prompts, order, state, objective: Objective, ctx: StepContext, timer: StepTimer,
            rank: int, world: int, sharded_policy=None, extra_reward=None, first_round: list[Sample] | None = None
            ) -> tuple[list[Sample], torch.Tensor | None, dict]:
    """The step's samples (and their rewards when the objective scores before the
    forward). With a group filter, more prompts are sampled until the step has
    prompts_per_step kept groups or the filter's extra rounds are spent; which groups
    are kept is decided on the stds of all ranks, in global prompt order, so every
    rank agrees and one process keeps what several would. `first_round`: the first
    round's samples, sampled ahead (AheadRollouts), its prompts already taken."""
    per_rank = cfg.prompts_per_step // world
    group_filter = objective.group_filter()
    rounds = 1 + (group_filter.extra_rounds if group_filter is not None else 0)
    kept, kept_rewards, n_kept, info = [], [], 0, {"rounds": 0}
    for round_ in range(rounds):
        if round_ > 0 or first_round is None:
            indices = order.take(state.data_position, cfg.prompts_per_step)
            state.data_position += cfg.prompts_per_step
        first = round_ * cfg.prompts_per_step + rank * per_rank
        with timer("rollout"):
            if sharded_policy is not None:
                sharded_policy.unshard()  # generation bypasses the root module's hooks
            if round_ == 0 and first_round is not None:
                samples = first_round
            else:
                samples = rollout(cfg, engine, prompts, indices[rank * per_rank:(rank + 1) * per_rank], first,
                                  ctx.step)
            samples = objective.continue_rollout(samples, engine, ctx)
            if sharded_policy is not None:
                sharded_policy.reshard()
        with timer("scoring"):
            rewards = objective.score(samples, ctx)
            if extra_reward is not None:
                bonus = extra_reward(samples)
                add_metric(ctx.metrics, "extra_reward", float(bonus.sum()), len(samples))
                if rewards is None:  # the objective's rewards come from the gradient forward (VeriFree)
                    ctx.extra_rewards = bonus
                else:
                    rewards = rewards + bonus
        info["rounds"] += 1
        if group_filter is None:
            return samples, rewards, info
        groups = torch.tensor([s.group for s in samples])
        ids, stds = group_stds(rewards, groups)
        step_stds = torch.zeros(cfg.prompts_per_step, dtype=torch.float64)
        step_stds[(ids - round_ * cfg.prompts_per_step).long()] = stds
        step_stds = distributed.all_sum_tensor(step_stds, ctx.device)
        keep = group_filter.keep(step_stds, ctx.step, round_)
        take = []
        for j in range(cfg.prompts_per_step):
            if keep[j] and n_kept < cfg.prompts_per_step:
                n_kept += 1
                take.append(round_ * cfg.prompts_per_step + j)
        mine = torch.isin(groups, torch.tensor(take, dtype=torch.long))
        kept += [s for s, m in zip(samples, mine.tolist()) if m]
        kept_rewards.append(rewards[mine])
        if n_kept >= cfg.prompts_per_step:
            break
    if n_kept < cfg.prompts_per_step and rank == 0:
        log.warning("step %d: %d of %d groups kept after %d extra sampling rounds (filter_rounds)", ctx.step, n_kept,
                    cfg.prompts_per_step, info["rounds"] - 1)
    info["groups_kept"] = n_kept
    return kept, torch.cat(kept_rewards) if kept_rewards else torch.zeros(0, dtype=torch.float64), info


def _check_data(cfg: TrainConfig, tokenizer, prompts: Prompts, objective: Objective) -> None:
    """References where the objective needs them, and room for a prompt and an answer."""
    missing = sum(not ex.answers for ex in prompts.examples)
    if missing and objective.needs_references:
        raise ConfigError(f"objective {cfg.objective} needs a reference answer for every question, and {missing} of "
                          f"the {len(prompts.examples)} in {cfg.data} have none (objectives for tasks without "
                          f"references: selfrubric)")
    n = min(256, len(prompts.examples))
    shortest = min(len(prompts[i]) + (len(tokenizer(cfg.answer_template.format(ref=prompts.examples[i].answers[0]),
                                                    add_special_tokens=False)["input_ids"])
                                      if prompts.examples[i].answers else 0) for i in range(n))
    if cfg.max_seq_len and cfg.max_seq_len < shortest + 2:
        raise ConfigError(f"max_seq_len {cfg.max_seq_len} is too short to hold any answer: the shortest prompt "
                          f"plus answer takes {shortest} tokens")


class ExtraReward:
    """`reward`: a verifier spec (pyvf.verify) whose scores are added to the objective's
    reward of every sample."""

    def __init__(self, cfg: TrainConfig, tokenizer, policy, examples):
        self.tokenizer = tokenizer
        self.verifier = get_verifier(cfg.reward, tokenizer=tokenizer, policy=policy, rubric=cfg.rubric or "story",
                                     marker=cfg.marker, answer_template=cfg.answer_template,
                                     max_seq_len=cfg.max_seq_len or None, token_budget=cfg.micro_batch_tokens,
                                     temperature=cfg.temperature)
        # Decided for the whole data set, so every rank passes the same kind of batch.
        self.with_references = all(ex.answers for ex in examples)

    def __call__(self, samples: list[Sample]) -> torch.Tensor:
        decode = self.tokenizer.decode
        # The prompt keeps its special tokens (a chat template's turns), as the policy saw it.
        prompts = [decode(s.prompt_ids, skip_special_tokens=False) for s in samples]
        completions = [decode(s.ids, skip_special_tokens=True) for s in samples]
        references = [list(s.example.answers) for s in samples] if self.with_references else None
        scores = torch.tensor(self.verifier(prompts, completions, references), dtype=torch.float64)
        return torch.where(torch.isnan(scores), torch.zeros_like(scores), scores)  # TRL's reading of None


def make_engine(cfg: TrainConfig, model, tokenizer, stop_token_ids: list[int], cache_dir: Path, sharded: bool,
                longest_sequence=None, version: int = 0, rank: int = 0, world: int = 1):
    """The rollout engine; `longest_sequence()` is the most tokens one sampled sequence
    can hold (vLLM's max_model_len). With engine processes, they start from the model's
    weights as policy `version`."""
    if cfg.rollout == "vllm":
        from pyvf.runtime.rollout.vllm import INSTALL_HINT, vllm_available

        if not vllm_available():
            raise ConfigError(f"--rollout vllm: {INSTALL_HINT}")
    if cfg.engine_procs():
        return engine_processes(cfg, model, tokenizer, stop_token_ids, cache_dir, longest_sequence, version, rank,
                                world)
    if cfg.rollout == "vllm":
        from pyvf.runtime.rollout.vllm import VLLMEngine

        return VLLMEngine.from_model(model, tokenizer, stop_token_ids=stop_token_ids, cache_dir=cache_dir,
                                     dtype=torch.bfloat16 if cfg.dtype == "bfloat16" else None,
                                     gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, seed=cfg.seed,
                                     max_model_len=longest_sequence())

    return HFGenerate(model, tokenizer, stop_token_ids=stop_token_ids, synced=sharded)


def engine_processes(cfg: TrainConfig, model, tokenizer, stop_token_ids: list[int], cache_dir: Path,
                     longest_sequence, version: int, rank: int = 0, world: int = 1):
    """cfg.engine_procs() engines, each on a copy of the model's architecture, started
    from its weights: processes started here on the model's device (on a CPU the cores
    are split between them and this process, rollout_threads), or the torchrun job's
    engine ranks (rollout_ranks), which every trainer rank sends its prompts to."""
    procs = cfg.engine_procs()
    device = next(model.parameters()).device
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    weights = model.state_dict()
    threads = spec_threads(procs, cfg.rollout_threads)
    vllm = {}
    if cfg.rollout == "vllm":
        vllm = dict(cache_dir=str(cache_dir), gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, seed=cfg.seed,
                    max_model_len=longest_sequence())
    if device.type == "cpu" and not cfg.rollout_ranks:
        torch.set_num_threads(max(1, cpu_cores() - procs * threads))
        log.info("train: %d CPU thread(s) train, %d engine process(es) sample on %d each", torch.get_num_threads(),
                 procs, threads)
    spec = EngineSpec(cfg.rollout, model.config, tokenizer, list(stop_token_ids), WeightLayout.of(weights, dtype),
                      dtype=dtype, threads=threads, device=str(device) if device.type == "cuda" else "cpu", vllm=vllm,
                      trainers=world)
    if cfg.rollout_ranks:
        return EngineProcesses(spec, procs, weights, version=version, store=distributed.job_store(), rank=rank)
    return EngineProcesses(spec, procs, weights, version=version)


class NonFiniteError(RuntimeError):
    """Too many steps in a row with a loss or gradient norm that is not finite."""


class Trainer:
    """`build` once (model, data, objective, engine, optimizer, a resumed state), then
    `step` per optimizer step, or `run` for the whole loop with its checkpoints."""

    def __init__(self, cfg: TrainConfig, **parts):
        self.cfg = cfg
        self.nonfinite_in_row = 0
        self._pending = None  # (step, future of an async save or None) until finish_save completes it
        self.ahead = None  # AheadRollouts (rollout_mode one_step_off, async)
        self.held_out = None  # Prompts of cfg.eval_data
        self.__dict__.update(parts)

    @classmethod
    def build(cls, cfg: TrainConfig, *, resume: str | None = None, engine=None, model=None,
              tokenizer=None) -> "Trainer":
        """Everything a run needs, from `cfg` (and the checkpoint `resume`). `engine`,
        `model` and `tokenizer` replace the ones cfg names (a benchmark's, a test's)."""
        cfg.validate()
        mixed = cfg.dtype == "bfloat16"  # bf16 compute, fp32 master weights: FSDP2's, in any number of processes
        rank, world, device = distributed.setup(cfg.device, group_of_one=mixed, engine_ranks=cfg.rollout_ranks)
        if device.type == "cpu":
            flush_subnormals(True)  # a tiny reward makes the backward subnormal, 100x slower on x86
        sharded = world > 1 or mixed
        if cfg.engine_procs() and world > 1 and not cfg.rollout_ranks:
            raise ConfigError(f"rollout_procs / rollout_mode {cfg.rollout_mode} start engine processes beside one "
                              f"trainer process, and this run has {world}: under torchrun, name the ranks that "
                              f"sample with --rollout-ranks K")
        if cfg.prompts_per_step % world:
            raise ConfigError(f"prompts_per_step {cfg.prompts_per_step} must be divisible by the {world} processes")
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        out_dir = Path(cfg.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            for stale in checkpoint.remove_staging(out_dir):
                log.info("train: removed %s, left by an interrupted save", stale)

        if model is None:
            model, tokenizer = load_model_and_tokenizer(cfg.model)  # fp32: the master weights
        check_vocabulary(model, tokenizer)
        stop_ids = stop_token_ids(model, tokenizer)
        model.to(device)
        if cfg.activation_checkpointing == "full" or (cfg.activation_checkpointing == "auto" and device.type == "cuda"):
            enable_activation_checkpointing(model)
        examples = dataset.load(cfg.data, n_synthetic=cfg.n_synthetic, keys=cfg.data_keys())
        objective = get_objective(cfg.objective)(cfg, tokenizer)
        prompts = Prompts(cfg, tokenizer, examples, objective)
        held_out = None
        if cfg.eval_data:  # read now: a bad file fails before the first step, not after it
            questions = dataset.load(cfg.eval_data, n_synthetic=cfg.eval_limit or 500, split="eval",
                                     keys=cfg.eval_keys())
            held_out = Prompts(cfg, tokenizer, questions[:cfg.eval_limit or None], objective)
            check_references(held_out.examples, f"eval_data {cfg.eval_data}")
        _check_data(cfg, tokenizer, prompts, objective)
        state = checkpoint.TrainerState(step=0, data_position=0, config=cfg.to_dict())
        optimizer_state = None
        policy = Policy(model, backend=cfg.logprob_backend, lm_head_pass=cfg.lm_head_pass)
        objective.attach(policy)
        if resume:
            model_state, optimizer_state, state, objective_state = checkpoint.load(resume,
                                                                                   rank=rank if sharded else None)
            # Full weights on every rank before sharding: the engine starts from them.
            load_weights(model, model_state if model_state is not None
                         else checkpoint.load_model_tensors(checkpoint.resolve(resume)))
            state.config = cfg.to_dict()
            objective.load_state_dict(objective_state)
            if rank == 0:
                log.info("resumed from %s at step %d", checkpoint.resolve(resume), state.step)
        else:
            objective.setup(policy, examples, prompts, device, rank=rank, world=world)
        # The engine starts from the unsharded weights (vLLM loads them from a directory).
        engine = engine or make_engine(
            cfg, model, tokenizer, stop_ids, out_dir / "cache" / f"rank{rank}", sharded,
            lambda: (max(len(p[i]) for p in (prompts, held_out) if p is not None for i in range(len(p.examples)))
                     + cfg.max_new_tokens + objective.continuation_tokens()),
            version=state.step, rank=rank, world=world)
        order = DataOrder(len(examples), cfg.seed)
        ahead = None
        if cfg.rollout_mode != "sync":
            if not hasattr(engine, "submit"):
                raise ConfigError(f"rollout_mode {cfg.rollout_mode} samples ahead on engine processes; the engine "
                                  f"given ({type(engine).__name__}) has no submit/result")
            ahead = AheadRollouts(cfg, engine, prompts, order, state, rank=rank, world=world)
            if resume:
                ahead.load_state_dict(checkpoint.load_rollout_state(resume))
        elif resume and checkpoint.load_rollout_state(resume).get("ranks"):
            log.warning("train: the checkpoint had batches in flight (rollout_mode %s); this sync run skips their "
                        "prompts", checkpoint.load_rollout_state(resume).get("mode"))
        if sharded:
            distributed.shard(policy, mixed_precision=mixed)
        objective.after_shard(sharded)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                      weight_decay=cfg.weight_decay)
        if optimizer_state is not None:  # a checkpoint written before DCP
            distributed.load_optimizer_state(optimizer, optimizer_state)
        elif resume:
            checkpoint.load_optimizer_shards(checkpoint.resolve(resume), policy, optimizer)
        if sharded:
            # FSDP2 picks its root at the first forward: make it the policy, before
            # generation runs the decoder layers on their own.
            with torch.no_grad():
                policy(pack([Sequence(stop_ids[:1], stop_ids[:1], [], group=0)]))
        if rank == 0:
            log.info("train: objective %s (loss %s), rollout engine %s, lm_head pass %s, %d process(es)",
                     cfg.objective, objective.config.loss_agg, getattr(engine, "name", type(engine).__name__),
                     cfg.lm_head_pass, world)
            log.info("train: stop tokens %s", tokenizer.convert_ids_to_tokens(stop_ids))
            log.info("train: %s", describe(tokenizer, chat_template=cfg.chat_template, system_prompt=cfg.system_prompt,
                                           assistant_prefix=cfg.assistant_prefix))
        return cls(cfg, rank=rank, world=world, device=device, sharded=sharded, out_dir=out_dir, tokenizer=tokenizer,
                   objective=objective, prompts=prompts, order=order, policy=policy, engine=engine, ahead=ahead,
                   optimizer=optimizer, state=state, resumed=bool(resume), stop_ids=stop_ids,
                   held_out=held_out,
                   extra_reward=ExtraReward(cfg, tokenizer, policy, examples) if cfg.reward else None,
                   metrics=MetricsLog(out_dir, resume_step=state.step if resume else 0) if rank == 0 else None)

    def step(self) -> dict:
        """One optimizer step on a fresh rollout; returns its metrics record (written to
        metrics.jsonl on rank 0)."""
        cfg, policy, engine = self.cfg, self.policy, self.engine
        step = self.state.step + 1
        t0 = time.perf_counter()
        timer = StepTimer()
        ctx = StepContext(step=step, policy=policy, temperature=cfg.temperature, device=self.device, world=self.world,
                          rank=self.rank)
        engine.wake()
        first_round, ahead_info = None, {}
        if self.ahead is not None:
            self.ahead.fill(step, step)  # in flight already, except at the first step and a resume
            with timer("rollout"):
                first_round, ahead_info = self.ahead.take(step)
        samples, rewards, info = collect(cfg, engine, self.prompts, self.order, self.state, self.objective, ctx, timer,
                                         self.rank, self.world,
                                         sharded_policy=policy if self.sharded and self.ahead is None
                                         and not hasattr(engine, "publish") else None,
                                         extra_reward=self.extra_reward, first_round=first_round)
        if self.ahead is not None:  # they sample while this step trains
            self.ahead.fill(step + 1, step + self.ahead.lead)
        engine.sleep()
        policy.train()
        sums = accumulate_gradients(cfg, self.objective, self.objective.config.loss_agg, policy, samples, rewards,
                                    ctx, timer)
        with timer("optimizer"):
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            # The loss is summed and the norm reduced over ranks, so every rank decides alike.
            finite = not sums["nonfinite"] and math.isfinite(sums["loss"]) and math.isfinite(_value(grad_norm))
            if finite and sums["samples_global"] > 0:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.state.step = step
        self.nonfinite_in_row = 0 if finite else self.nonfinite_in_row + 1
        if not finite and self.rank == 0:
            log.warning("step %d: loss %s, gradient norm %s: not finite, the step is skipped (%d in a row)", step,
                        sums["loss"], _value(grad_norm), self.nonfinite_in_row)
        if hasattr(engine, "publish"):  # engine processes: every step is a version, updated or not
            with timer("weight_sync"):
                weights = distributed.full_model_state(policy, True) if self.sharded else policy.model.state_dict()
                engine.publish(weights, step)
        elif finite and cfg.rollout == "vllm":
            with timer("weight_sync"):  # device tensors in one process, gathered shards under torchrun
                weights = distributed.full_model_state(policy, True) if self.sharded else policy.model.state_dict()
                engine.update_weights(weights.items())
        engine_times = engine.step_times() if hasattr(engine, "step_times") else {}
        record = step_record(cfg, step, sums, ctx, info, grad_norm, timer, time.perf_counter() - t0, self.world,
                             self.device)
        record["skipped_nonfinite"] = 0 if finite else 1
        if hasattr(engine, "publish"):
            record["engine_idle_s"] = engine_times.get("engine_idle_s", 0.0)
            record["trainer_idle_s"] = engine_times.get("wait_s", 0.0)
            record["dropped_groups"] = ahead_info.get("dropped_groups", 0)
        if self.held_out is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps):
            record.update(self.evaluate())
        if self.rank == 0:
            self.metrics.write(record)
            if sums["over_length"]:
                log.warning("step %d: %d of %d samples did not fit max_seq_len %d (prompt + completion + answer): "
                            "trained on the part that fits, reward 0 where the answer did not fit; raise "
                            "--max-seq-len, or leave it at 0 (what the step produces)", step, sums["over_length"],
                            sums["samples_global"], cfg.max_seq_len)
            if record.get("rollout_logprob_diff", 0.0) > cfg.rollout_logprob_warn:
                log.warning("step %d: engine and trainer log-probs differ by %.3g on average (> %g): are the "
                            "engine's weights in sync?", step, record["rollout_logprob_diff"], cfg.rollout_logprob_warn)
        if self.nonfinite_in_row >= cfg.max_nonfinite_steps:
            raise NonFiniteError(f"step {step}: the loss or gradient norm was not finite for {self.nonfinite_in_row} "
                                 f"steps in a row (max_nonfinite_steps); no update was applied, and the last "
                                 f"checkpoint in {self.out_dir / 'checkpoints'} holds the last good weights")
        return record

    def evaluate(self) -> dict:
        """The current weights' accuracy on cfg.eval_data, prompts rendered as in training:
        the metrics `eval_accuracy` (avg@k), `eval_pass@k` (k > 1) and
        `eval_accuracy/<category>`; every completion goes to eval/step-N.json (rank 0).
        It decodes with the colocated engine (HF, or vLLM whose weights are current), or
        HF on the trainer's own weights when engines sample in processes of their own
        (their weights lag); each rank evaluates its share."""
        cfg, engine, policy = self.cfg, self.engine, self.policy
        if hasattr(engine, "publish"):
            engine = HFGenerate(policy.model, self.tokenizer, stop_token_ids=self.stop_ids, synced=self.sharded)
        unshard = self.sharded and engine.name == "hf"
        started = time.perf_counter()
        if unshard:
            policy.unshard()  # generation bypasses the root module's hooks
        try:
            result = evaluate_examples(engine, self.tokenizer, self.held_out.examples, samples=cfg.eval_samples,
                                       temperature=cfg.eval_temperature, max_new_tokens=cfg.max_new_tokens,
                                       stop=cfg.stop_strings(), seed=cfg.seed, render=self.held_out.render,
                                       rank=self.rank, world=self.world)
        finally:
            if unshard:
                policy.reshard()
            engine.sleep()
        seconds = time.perf_counter() - started
        avg, pass_ = metric_names(cfg.eval_samples)
        metrics = {"eval_accuracy": result[avg], "eval_s": seconds}
        if cfg.eval_samples > 1:
            metrics[f"eval_{pass_}"] = result[pass_]
        for name, c in result.get("categories", {}).items():
            metrics[f"eval_accuracy/{name}"] = c[avg]
        if self.rank == 0:
            path = checkpoint.write_atomic(self.out_dir / "eval" / f"step-{self.state.step:06d}.json",
                                           json.dumps({"step": self.state.step, "data": cfg.eval_data, **result},
                                                      indent=2))
            log.info("eval step %d: %s %.1f%%%s on %s (%d questions, %s, %.1f s; %s)", self.state.step, avg,
                     100 * result[avg], f", {pass_} {100 * result[pass_]:.1f}%" if cfg.eval_samples > 1 else "",
                     cfg.eval_data, result["n"], result["answer_format"], seconds, path)
        return metrics

    def save(self) -> None:
        """A checkpoint of this step: every rank writes its shards of the policy and optimizer
        (DCP, nothing gathered), rank 0 the RNG, objective and data state of this moment.
        Sync: completed (renamed into place) here. Async: the shards are copied to memory
        and written in the background; completed by finish_save (the next save, the end)."""
        started = time.perf_counter()  # the stall: all the time training waits here
        self.finish_save()  # one save in flight at a time
        step = self.state.step
        objective_state = self.objective.state_dict()  # every rank: it may gather shards
        rollout_state = None
        if self.ahead is not None:  # every rank's batches in flight, kept by rank 0
            rollout_state = {"mode": self.cfg.rollout_mode,
                             "ranks": distributed.all_gather_objects(self.ahead.state_dict())}
        future = checkpoint.save_shards(self.out_dir, step, self.policy, self.optimizer,
                                        use_async=self.cfg.async_checkpoint,
                                        async_group=self._async_group() if self.cfg.async_checkpoint else None)
        if self.rank == 0:
            checkpoint.stage_state(self.out_dir, state=self.state, objective_state=objective_state,
                                   rollout_state=rollout_state)
        self._pending = (step, future)
        if future is None:
            self.finish_save()
        if self.rank == 0:
            log.info("checkpoint: step %d, training stalled %.3f s (%s)", step, time.perf_counter() - started,
                     "async" if future is not None else "sync")

    def finish_save(self) -> None:
        """Completes the save in flight, if any: waits for its shards, then rank 0 renames it
        into place while the others wait (every rank calls this at the same points)."""
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        if future is not None:
            future.result()  # rank 0's completes after every rank's shards and the metadata
        distributed.barrier()
        if self.rank == 0:
            path = checkpoint.complete(self.out_dir, step, model=self.policy.model, tokenizer=self.tokenizer,
                                       keep=self.cfg.keep_checkpoints)
            log.info("checkpoint: %s", path)
        distributed.barrier()

    def close(self) -> None:
        """Ends the engine processes, if any (`run` does at its end)."""
        if hasattr(self.engine, "close"):
            self.engine.close()

    def _async_group(self):
        """A gloo process group for async saves alone (None without a process group): the
        background thread's collectives must not interleave with training's."""
        if not hasattr(self, "_checkpoint_group"):
            import torch.distributed as dist

            self._checkpoint_group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        return self._checkpoint_group

    def run(self) -> dict:
        """Steps up to cfg.max_steps with progress, checkpoints (every save_every steps or
        save_every_minutes, at the end, at stop_after and when a preemption signal came) and
        the plot; returns the last step's metrics."""
        cfg, state = self.cfg, self.state
        progress = None
        if self.rank == 0 and cfg.progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=cfg.max_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True)
        record: dict = {}
        last_saved = state.step if self.resumed else -1
        saved_at = time.monotonic()
        try:
            with PreemptionGuard() as guard:
                while state.step < cfg.max_steps:
                    record = self.step()
                    stop = self._after_step(record, progress, guard, saved_at)
                    if stop is not None:
                        last_saved, saved_at = state.step, time.monotonic()
                        if stop:
                            break
        except NonFiniteError:
            self.finish_save()  # every rank raises it at the same step: the last good weights
            self.close()
            raise
        except BaseException:
            self.close()
            raise
        finally:
            if progress is not None:
                progress.close()
        if state.step != last_saved and state.step > 0:
            self.save()
        self.finish_save()
        self.close()
        if self.rank == 0:
            if cfg.plot:
                plot(self.metrics.records(), self.out_dir / "metrics.png", title=f"pyvf {cfg.objective} ({cfg.model})")
            self.metrics.close()
        distributed.teardown()
        return record

    def _after_step(self, record: dict, progress, guard: PreemptionGuard, saved_at: float) -> bool | None:
        """Logs the step and saves when due: None when nothing was saved, else whether the
        run stops here (stop_after, or a preemption signal on any rank)."""
        cfg, step = self.cfg, self.state.step
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.4f}", reward=f"{record['reward_mean']:.3f}",
                                 marker=f"{record.get('marker_frac', 0.0):.2f}")
        elif self.rank == 0 and step % cfg.log_every == 0:
            log.info("step %d loss %.4f reward %.3f marker %.2f (%.1f s)", step, record["loss"],
                     record["reward_mean"], record.get("marker_frac", 0.0), record["step_time"])
        # Every rank must take the same decision (a save is collective).
        preempted = distributed.all_max(float(guard.requested is not None), self.device) > 0
        overdue = cfg.save_every_minutes and time.monotonic() - saved_at >= 60 * cfg.save_every_minutes
        overdue = distributed.all_max(float(bool(overdue)), self.device) > 0
        stopping = bool(cfg.stop_after and step >= cfg.stop_after) or preempted
        if not ((cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps or stopping or overdue):
            return None
        self.save()
        if preempted and self.rank == 0:
            log.warning("train: stopped by %s after step %d, checkpoint written; continue with --resume %s",
                        guard.requested or "a signal on another rank", step, self.out_dir)
        return stopping


def train(cfg: TrainConfig, *, resume: str | None = None, engine=None) -> dict:
    """Runs optimizer steps up to cfg.max_steps (from a checkpoint when `resume` is
    given) and returns the last step's metrics. On an engine rank of rollout_ranks: serves
    rollouts until the trainer ends, and returns {}."""
    index = distributed.engine_rank(cfg.rollout_ranks)
    if index is not None:
        want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if want_cuda else "cpu"
        serve_engine_rank(distributed.job_store(), index, cfg.rollout_ranks + 1, device)
        return {}
    return Trainer.build(cfg, resume=resume, engine=engine).run()


def _trained_rows(seq: Sequence) -> int:
    return len(seq) - len(seq.prompt_ids) if seq.prompt_ids else max(len(seq) - 1, 0)


def plan_step(seqs: list[Sequence], budget: int, reward_pass: str | None) -> tuple[list[list[int]], list[int]]:
    """(micro-batches, separated): the step's micro-batches of at most `budget` tokens
    (lists of sequence indices), and the sequences whose rewards the separate reward pass
    computes first. reward_pass None: the rewards are known before the forward, so a
    micro-batch takes any sequences. Otherwise they come from the gradient forward:
    fused keeps each group in one micro-batch, separate scores every group first, auto
    keeps the groups that fit whole and separates the rest. A micro-batch never mixes
    fused and separated sequences."""
    lengths = [len(q) for q in seqs]
    if lengths and max(lengths) > budget:
        raise ConfigError(f"a training sequence has {max(lengths)} tokens, more than micro_batch_tokens ({budget}), "
                          f"and a sequence is never split: raise micro_batch_tokens or lower max_new_tokens")
    groups = [q.group for q in seqs]
    size: dict[int, int] = {}
    for g, n in zip(groups, lengths):
        size[g] = size.get(g, 0) + n
    if reward_pass is None or reward_pass == "separate":
        whole, separated = [], list(range(len(seqs)))
    else:
        big = sorted(g for g, n in size.items() if n > budget)
        if big and reward_pass == "fused":
            raise ConfigError(f"group {big[0]} has {size[big[0]]} tokens, more than micro_batch_tokens ({budget}); "
                              f"reward_pass fused trains each group in one micro-batch: raise micro_batch_tokens, "
                              f"or use reward_pass auto or separate (a no-grad reward pass first)")
        whole = [i for i, g in enumerate(groups) if size[g] <= budget]
        separated = [i for i, g in enumerate(groups) if size[g] > budget]

    def plan(index: list[int], keys: list[int]) -> list[list[int]]:
        return [[index[j] for j in mb] for mb in
                plan_micro_batches([lengths[i] for i in index], keys, budget)] if index else []

    plan_whole = plan(whole, [groups[i] for i in whole])
    plan_any = plan(separated, list(range(len(separated))))
    return plan_whole + plan_any, (separated if reward_pass is not None else [])


def separate_reward_pass(cfg: TrainConfig, objective: Objective, policy: Policy, train: TrainSequences,
                         index: list[int], ctx: StepContext) -> None:
    """A no-grad forward over sequences `index` (whole groups) in micro-batches of any
    sequences, with only the objective's `look` rows through the lm_head; the objective
    turns their log-probs into the groups' rewards (`rewards_from_look`). Every rank runs
    as many forwards as the busiest one (FSDP2's collectives pair up)."""
    device = ctx.device
    plan = plan_micro_batches([len(train.sequences[i]) for i in index], list(range(len(index))),
                              cfg.micro_batch_tokens) if index else []
    looked: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for k in range(int(distributed.all_max(float(len(plan)), device))):
            if k >= len(plan):
                policy(pack([Sequence([0], [0], [], group=-1)]), cfg.temperature)
                continue
            mb = train.micro_batch([index[j] for j in plan[k]], device)
            rows = objective.look(mb, ctx)
            if rows is None:
                raise ValueError(f"objective {objective.name!r}: look() must name the rows its rewards are read "
                                 f"from for the separate reward pass, got None")
            logprobs = policy(mb.batch, cfg.temperature, look=rows).cpu().double()
            rows = rows.cpu()
            starts = mb.batch.cu_seqlens.tolist()
            for b, i in enumerate(mb.index):
                span = slice(starts[b], starts[b + 1])
                looked[i] = logprobs[span][rows[span]]
    objective.rewards_from_look(train, index, [looked[i] for i in index], ctx)


def accumulate_gradients(cfg: TrainConfig, objective: Objective, loss_agg: str, policy: Policy,
                         samples: list[Sample], rewards: torch.Tensor | None, ctx: StepContext,
                         timer: StepTimer | None = None) -> dict:
    """Backward of one step's samples (gradients accumulate in the parameters); returns
    the step's sums for the metrics, over all ranks. `rewards` None: the objective
    rewards in the gradient forward (cfg.reward_pass says how)."""
    device, world = ctx.device, ctx.world
    timer = timer or StepTimer()
    ctx.samples = samples
    groups = torch.tensor([s.group for s in samples], dtype=torch.long)
    if rewards is not None:
        ctx.rewards = rewards.double()
        ctx.advantages = (grouped_advantages(rewards.float(), groups, estimator=objective.advantage_estimator,
                                             eps=objective.advantage_eps)
                          if len(samples) else torch.zeros(0))
    train_seqs = objective.sequences(samples) if samples else TrainSequences([], [], [])
    seqs = train_seqs.sequences
    rows_per_sample = torch.zeros(len(samples))
    for seq, i in zip(seqs, train_seqs.owner):
        rows_per_sample[i] += _trained_rows(seq)
    n_samples, n_rows = distributed.all_sum([float(len(samples)), float(rows_per_sample.sum())], device)

    plan, separated = plan_step(seqs, cfg.micro_batch_tokens, None if rewards is not None else cfg.reward_pass)
    if rewards is None:  # every rank takes part, separated sequences or not (collectives)
        with timer("reward_pass"):
            separate_reward_pass(cfg, objective, policy, train_seqs, separated, ctx)
    # Every rank runs as many forwards as the busiest one (FSDP2's collectives pair up).
    n_micro = int(distributed.all_max(float(len(plan)), device))
    sums = dict(loss=0.0, tokens=0.0, diff=0.0, diff_n=0.0, entropy=0.0, entropy_n=0.0, nonfinite=0.0,
                micro_batches=float(len(plan)), sequences=float(len(seqs)), separated=float(len(separated)),
                is_weight=0.0, is_tokens=0.0, is_capped=0.0, staleness=0.0)
    maxima = dict(is_weight_max=0.0, staleness_max=0.0)
    # Behaviour log-probs of the samples whose sampling policy is not the trained one (an
    # older version, an engine with other numerics): their sampled tokens get TIS weights.
    behaviour = [s.rollout_logprobs if (cfg.tis_cap and not objective.weights_sampled_tokens
                                        and not s.behaviour_is_current(ctx.step)) else None for s in samples]
    for s in samples:
        lag = ctx.step - 1 - s.policy_version if s.policy_version is not None else 0
        sums["staleness"] += lag
        maxima["staleness_max"] = max(maxima["staleness_max"], float(lag))
    with timer("forward_backward"):
        for k in range(n_micro):
            if k >= len(plan):
                dummy = pack([Sequence([0], [0], [], group=-1)])
                loss, _, _ = policy(dummy, cfg.temperature,
                                    coefficients=lambda _: (torch.zeros(2, device=device), None))
                (loss * 0).backward()
                continue
            mb = train_seqs.micro_batch(plan[k], device)
            _backward(cfg, objective, loss_agg, policy, mb, ctx, sums, world,
                      aggregation_scale(loss_agg, mb, trained_rows_per_sample=rows_per_sample,
                                        n_samples=int(n_samples), n_trained_rows=int(n_rows)), behaviour, maxima)

    sums["reward"] = float(ctx.rewards.sum()) if ctx.rewards is not None else 0.0
    sums["adv_sq"] = float((ctx.advantages.double() ** 2).sum()) if ctx.advantages is not None else 0.0
    objective.sample_metrics(samples, ctx)
    sums["truncated"] = float(sum(s.truncated for s in samples))
    sums["over_length"] = float(sum(s.over_length for s in samples))
    sums["stopped"] = float(sum(s.finish == "stop" for s in samples))
    sums["completion_len"] = float(sum(len(s.ids) for s in samples))
    keys = list(sums)
    totals = dict(zip(keys, distributed.all_sum([sums[k] for k in keys], device)))
    totals["samples_global"] = n_samples
    for key, value in maxima.items():
        totals[key] = distributed.all_max(value, device)
    # The objective's own metrics: (sum, count) pairs reduced the same way.
    names = sorted(ctx.metrics)
    flat = distributed.all_sum([v for k in names for v in ctx.metrics[k][:2]], device)
    totals["objective"] = {k: (flat[2 * j], flat[2 * j + 1], ctx.metrics[k][2]) for j, k in enumerate(names)}
    return totals


def _backward(cfg: TrainConfig, objective: Objective, loss_agg: str, policy: Policy, mb: MicroBatch,
              ctx: StepContext, sums: dict, world: int, scale: torch.Tensor, behaviour: list | None = None,
              maxima: dict | None = None) -> None:
    """One micro-batch: the objective's look and coefficients, the lm_head pass, backward.
    `behaviour[i]`: sample i's behaviour log-probs where its sampled tokens take a TIS
    weight min(pi / pi_behaviour, tis_cap) on their coefficients (None: no weight)."""
    device = ctx.device
    batch = mb.batch
    own_look = objective.look(mb, ctx)
    behaviour_rows = per_token_rows(mb, behaviour) if behaviour is not None and any(
        b is not None for b in behaviour) else None
    weighted = None if behaviour_rows is None else ~torch.isnan(behaviour_rows)
    if weighted is not None and not weighted.any():
        weighted = None
    look = own_look if weighted is None else (weighted if own_look is None else own_look.to(device) | weighted)

    def coefficients(looked):
        seen = looked
        if weighted is not None and cfg.lm_head_pass == "fused":
            # the objective sees its own rows, as it would without the weighted ones
            seen = None if own_look is None else torch.where(own_look.to(device), looked, torch.zeros_like(looked))
        c, e = objective.coefficients(mb, seen, ctx)
        if weighted is not None:
            ratio = torch.exp(looked.detach().double() - torch.where(weighted, behaviour_rows, 0.0))
            w = torch.where(weighted, ratio.clamp(max=cfg.tis_cap), torch.ones_like(ratio))
            c = c.to(device) * w.to(c.dtype)
            sums["is_weight"] += float(ratio[weighted].clamp(max=cfg.tis_cap).sum())
            sums["is_tokens"] += float(weighted.sum())
            sums["is_capped"] += float((ratio[weighted] > cfg.tis_cap).sum())
            maxima["is_weight_max"] = max(maxima["is_weight_max"], float(ratio[weighted].max()))
        c, e = c.to(device) * scale, (None if e is None else e.to(device) * scale)
        if not (torch.isfinite(c).all() and (e is None or torch.isfinite(e).all())):
            # An overflow upstream (the look, a reward): this micro-batch trains
            # nothing and the step is skipped (Trainer.step).
            sums["nonfinite"] += 1
            return torch.zeros_like(c), None
        return c, e

    loss, logprobs, entropy = policy(batch, cfg.temperature, coefficients=coefficients, look=look)
    # FSDP2 averages gradients over ranks; the coefficients already divide by the
    # step's global totals, so each rank's share is scaled back up.
    (loss * world).backward()
    sums["loss"] += float(loss.detach())
    sums["tokens"] += batch.input_ids.numel()
    trained = batch.targets != batch.ignore_index
    if entropy is not None:
        sums["entropy"] += float(entropy.cpu()[trained].sum())
        sums["entropy_n"] += float(trained.sum())
    engine = per_token_rows(mb, [s.rollout_logprobs for s in ctx.samples]).cpu()
    sampled = ~torch.isnan(engine)
    sums["diff"] += float((logprobs.detach().cpu().double()[sampled] - engine[sampled]).abs().sum())
    sums["diff_n"] += float(sampled.sum())


def _value(norm) -> float:
    """A gradient norm as a float (a sharded run's is a DTensor)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def step_record(cfg, step, t, ctx, info, grad_norm, timer, dt, world, device) -> dict:
    n = max(t["samples_global"], 1.0)
    record = {
        "step": step,
        "loss": t["loss"],
        "reward_mean": t["reward"] / n,
        "advantage_std": (t["adv_sq"] / n) ** 0.5,
        "truncated_frac": t["truncated"] / n,
        "over_length_frac": t["over_length"] / n,
        "micro_batches": t["micro_batches"],
        "separated_frac": t["separated"] / max(t["sequences"], 1.0),
        "stop_frac": t["stopped"] / n,
        "reasoning_len": t["completion_len"] / n,
        "entropy": t["entropy"] / max(t["entropy_n"], 1.0),
        "rollout_logprob_diff": t["diff"] / max(t["diff_n"], 1.0),
        "staleness": t["staleness"] / n,
        "staleness_max": t["staleness_max"],
        "is_weight": t["is_weight"] / t["is_tokens"] if t["is_tokens"] else 1.0,
        "is_weight_max": t["is_weight_max"] if t["is_tokens"] else 1.0,
        "is_capped_frac": t["is_capped"] / max(t["is_tokens"], 1.0),
        "grad_norm": _value(grad_norm),
        "tokens_per_s": t["tokens"] / dt,
        "step_time": dt,
        "lr": cfg.lr,
    }
    for key, (s, c, root) in t["objective"].items():
        value = s / max(c, 1.0)
        record[key] = value ** 0.5 if root else value
    if "groups_kept" in info:
        record["groups_kept"] = info["groups_kept"]
        record["sampling_rounds"] = info["rounds"]
    for phase in ("rollout", "scoring", "reward_pass", "forward_backward", "optimizer", "weight_sync"):
        record[f"time_{phase}"] = timer.seconds.get(phase, 0.0)
    record["rollout_time"] = record["time_rollout"]
    return record
