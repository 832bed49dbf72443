"""The VeriFree training loop, top to bottom:

    rollout (G samples per prompt) -> splice the reference after each reasoning
    -> pack whole groups into micro-batches -> one forward with grad returning hidden
    states -> token_logprobs on the reasoning and answer rows only -> verifree_loss
    -> backward -> grad-norm clip -> AdamW step -> metrics, checkpoint.

One optimizer step per rollout batch, on-policy, no reference model (DESIGN.md 1.1).
The other objectives (`--objective rlpr|nover|verifier`, pyvf/objectives.py) take the
same loop with their rewards computed before the gradient forward.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pyvf.data import dataset
from pyvf.data.synthetic import PROMPT_TEMPLATE
from pyvf.losses import verifree_loss
from pyvf.objectives import OBJECTIVES, Sampled, policy_gradient_loss, ppo_clip_loss
from pyvf.ops import grouped_advantages
from pyvf.packing import ROLE_REASONING, Sequence, pack, plan_micro_batches
from pyvf.splice import splice_reference
from pyvf.train import checkpoint, distributed
from pyvf.train.config import ConfigError, TrainConfig
from pyvf.train.metrics import MetricsLog, plot
from pyvf.train.model import PolicyLogprobs, load_model_and_tokenizer, load_weights
from pyvf.train.rollout import HFGenerate, RolloutEngine, prompt_seed

log = logging.getLogger("pyvf")


def render_prompt(cfg: TrainConfig, question: str) -> str:
    return (cfg.prompt_template or PROMPT_TEMPLATE).format(question=question)


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


@dataclass
class Rollout:
    sequences: list[Sequence]      # one per (completion, reference)
    completion: list[int]          # completion index of each sequence
    weights: list[float]           # reference weight of each sequence
    n_completions: int
    truncated: int       # completions that hit max_new_tokens
    with_marker: int     # completions whose text contains the marker
    samples: list[Sampled]  # the completions as sampled, for the other objectives


def collect_rollout(cfg: TrainConfig, engine: RolloutEngine, tokenizer, examples, indices: list[int],
                    first_prompt: int, step: int) -> Rollout:
    """Samples G completions for each prompt and splices every reference after them.
    Prompt j (global index first_prompt + j in the step) forms group j."""
    seqs, completion, weights = [], [], []
    n_comp = truncated = with_marker = 0
    samples_out = []
    for j, idx in enumerate(indices):
        ex = examples[idx]
        prompt_ids = tokenizer(render_prompt(cfg, ex.question), add_special_tokens=False)["input_ids"]
        room = max(0, cfg.max_seq_len - len(prompt_ids))  # reasoning tokens that fit after the prompt
        samples = engine.sample(prompt_ids, cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                                temperature=cfg.temperature, seed=prompt_seed(cfg.seed, step, first_prompt + j))
        for sample in samples:
            truncated += sample.truncated
            spliced = splice_reference(tokenizer, sample.ids, list(ex.answers), marker=cfg.marker,
                                       answer_template=cfg.answer_template)
            with_marker += spliced[0].found
            samples_out.append(Sampled(prompt_ids, sample.ids, sample.truncated, spliced, ex.answers, ex.weights, j,
                                       sample.logprobs))
            if sample.truncated or not spliced[0].found:
                # Reward 0; the completion as sampled still gets its policy-gradient term.
                reasoning = sample.ids[:room]
                seqs.append(Sequence(prompt_ids, reasoning, [], group=j))
                completion.append(n_comp)
                weights.append(1.0)
            else:
                for s, w in zip(spliced, ex.weights):
                    answer = s.answer_ids
                    reasoning = s.reasoning_ids[:room]
                    if len(prompt_ids) + len(reasoning) + len(answer) > cfg.max_seq_len:
                        answer = []  # over the length limit: reward 0
                    seqs.append(Sequence(prompt_ids, reasoning, answer, group=j))
                    completion.append(n_comp)
                    weights.append(w)
            n_comp += 1
    return Rollout(seqs, completion, weights, n_comp, truncated, with_marker, samples_out)


def _check_length_limit(cfg: TrainConfig, tokenizer, examples) -> None:
    shortest = min(
        len(tokenizer(render_prompt(cfg, ex.question), add_special_tokens=False)["input_ids"])
        + len(tokenizer(cfg.answer_template.format(ref=ex.answers[0]), add_special_tokens=False)["input_ids"])
        for ex in examples[:256])
    if cfg.max_seq_len < shortest + 2:
        raise ConfigError(f"max_seq_len {cfg.max_seq_len} is too short to hold any answer: the shortest prompt "
                          f"plus answer takes {shortest} tokens")


def train(cfg: TrainConfig, *, resume: str | None = None, engine: RolloutEngine | None = None) -> dict:
    """Runs cfg.max_steps optimizer steps (from a checkpoint when `resume` is given) and
    returns the last step's metrics."""
    cfg.validate()
    rank, world, device = distributed.setup(cfg.device)
    sharded = world > 1
    if cfg.prompts_per_step % world:
        raise ConfigError(f"prompts_per_step {cfg.prompts_per_step} must be divisible by the {world} processes")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    model, tokenizer = load_model_and_tokenizer(cfg.model, dtype)
    model.to(device)
    examples = dataset.load(cfg.data, n_synthetic=cfg.n_synthetic)
    _check_length_limit(cfg, tokenizer, examples)
    state = checkpoint.TrainerState(step=0, data_position=0, config=cfg.to_dict())
    optimizer_state = None
    if resume:
        model_state, optimizer_state, state = checkpoint.load(resume, rank=rank if sharded else None)
        load_weights(model, model_state)
        state.config = cfg.to_dict()
        if rank == 0:
            log.info("resumed from %s at step %d", resume, state.step)
    policy = PolicyLogprobs(model, cfg.logprob_backend)
    objective = None
    if cfg.objective != "verifree":
        if sharded:
            raise ConfigError(f"objective {cfg.objective} runs in a single process; use verifree under torchrun")
        objective = OBJECTIVES[cfg.objective](tokenizer, policy=policy)
    if sharded:
        distributed.shard(policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  weight_decay=cfg.weight_decay)
    if optimizer_state is not None:
        distributed.load_optimizer_state(optimizer, optimizer_state)
    if sharded:
        # FSDP2 picks its root at the first forward: make it the policy, before
        # generate() runs the decoder layers on their own.
        with torch.no_grad():
            eos = tokenizer.eos_token_id
            policy(pack([Sequence([eos], [eos], [], group=0)]))
    engine = engine or HFGenerate(model, tokenizer, synced=sharded)
    order = DataOrder(len(examples), cfg.seed)
    metrics = MetricsLog(out_dir, resume_step=state.step if resume else 0) if rank == 0 else None

    progress = None
    if rank == 0 and cfg.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.max_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True)
    record: dict = {}
    last_saved = state.step if resume else -1
    try:
        while state.step < cfg.max_steps:
            step = state.step + 1
            t0 = time.perf_counter()
            indices = order.take(state.data_position, cfg.prompts_per_step)
            per_rank = cfg.prompts_per_step // world
            mine = indices[rank * per_rank:(rank + 1) * per_rank]
            if sharded:
                policy.unshard()  # generate() bypasses the root module's hooks
            rollout = collect_rollout(cfg, engine, tokenizer, examples, mine, rank * per_rank, step)
            if sharded:
                policy.reshard()
            t_rollout = time.perf_counter() - t0

            policy.train()
            sums = new_sums(rollout)
            accumulate_gradients(cfg, objective, policy, rollout, step, device, sums)
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step = step
            state.data_position += cfg.prompts_per_step

            keys = list(sums)
            totals = dict(zip(keys, distributed.all_sum([sums[k] for k in keys], device)))
            n = max(totals["completions"], 1.0)
            dt = time.perf_counter() - t0
            record = {
                "step": step,
                "loss": totals["loss"] / world,
                "reward_mean": totals["reward"] / n,
                "advantage_std": (totals["adv_sq"] / n) ** 0.5,
                "marker_frac": totals["marker"] / n,
                "rewarded_frac": totals["found"] / n,
                "truncated_frac": totals["truncated"] / n,
                "reasoning_len": totals["reasoning_len"] / n,
                "answer_len": totals["answer_len"] / n,
                "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
                "tokens_per_s": totals["tokens"] / dt,
                "step_time": dt,
                "rollout_time": t_rollout,
                "lr": cfg.lr,
            }
            if rank == 0:
                metrics.write(record)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{record['loss']:.4f}", reward=f"{record['reward_mean']:.3f}",
                                         marker=f"{record['marker_frac']:.2f}")
                elif step % cfg.log_every == 0:
                    log.info("step %d loss %.4f reward %.3f marker %.2f (%.1f s)", step, record["loss"],
                             record["reward_mean"], record["marker_frac"], dt)

            stopping = cfg.stop_after and step >= cfg.stop_after
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps or stopping:
                _save(out_dir, policy, optimizer, state, tokenizer, sharded, rank)
                last_saved = step
            if stopping:
                break
    finally:
        if progress is not None:
            progress.close()
    if state.step != last_saved and state.step > 0:
        _save(out_dir, policy, optimizer, state, tokenizer, sharded, rank)
    if rank == 0:
        if cfg.plot:
            plot(metrics.records(), out_dir / "metrics.png", title=f"pyvf {cfg.objective} ({cfg.model})")
        metrics.close()
    distributed.teardown()
    return record


def new_sums(rollout: Rollout) -> dict:
    return dict(loss=0.0, reward=0.0, reward_sq=0.0, adv_sq=0.0, found=0.0, reasoning_len=0.0, answer_len=0.0,
                tokens=0.0, completions=0.0, truncated=float(rollout.truncated), marker=float(rollout.with_marker))


def accumulate_gradients(cfg, objective, policy, rollout, step, device, sums) -> None:
    """Backward of one rollout batch (gradients accumulate in the parameters; sums
    collects the metrics)."""
    if objective is not None:
        _objective_step(cfg, objective, policy, rollout, step, device, sums)
        return
    lengths = [len(s) for s in rollout.sequences]
    groups = [s.group for s in rollout.sequences]
    for mb in plan_micro_batches(lengths, groups, cfg.micro_batch_tokens):
        batch = pack([rollout.sequences[i] for i in mb])
        comp = torch.tensor([rollout.completion[i] for i in mb])
        logprobs = policy(batch, cfg.temperature)
        out = verifree_loss(logprobs, batch.roles.to(device), batch.cu_seqlens.to(device), batch.groups.to(device),
                            completion=comp.to(device),
                            weights=torch.tensor([rollout.weights[i] for i in mb], device=device),
                            num_completions_total=rollout.n_completions)
        out.loss.backward()
        sums["loss"] += out.loss.item()
        sums["reward"] += out.rewards.sum().item()
        sums["reward_sq"] += (out.rewards.double() ** 2).sum().item()
        sums["adv_sq"] += (out.advantages.double() ** 2).sum().item()
        sums["found"] += out.found.sum().item()
        sums["reasoning_len"] += out.reasoning_len.sum().item()
        sums["answer_len"] += out.answer_len.sum().item()
        sums["tokens"] += batch.input_ids.numel()
        sums["completions"] += out.rewards.numel()


def _objective_step(cfg, objective, policy, rollout, step, device, sums) -> None:
    """Rewards from the objective (before the gradient forward), GRPO advantages over
    the kept groups, then the policy gradient on the sampled completions."""
    samples = rollout.samples
    rewards = objective.rewards(samples, policy, cfg.temperature, step).float()
    groups = torch.tensor([s.group for s in samples])
    keep = objective.keep(rewards, groups)
    advantages = grouped_advantages(rewards, groups, estimator="grpo") * keep
    limit = lambda s: s.ids[:max(0, cfg.max_seq_len - len(s.prompt_ids))]  # noqa: E731
    seqs = [Sequence(s.prompt_ids, limit(s), [], group=s.group) for s in samples]
    clipped = getattr(objective, "clipped", False)
    for mb in plan_micro_batches([len(q) for q in seqs], groups.tolist(), cfg.micro_batch_tokens):
        batch = pack([seqs[i] for i in mb])
        logprobs = policy(batch, cfg.temperature)
        roles, cu = batch.roles.to(device), batch.cu_seqlens.to(device)
        if clipped:
            # Rollout log-probs onto the packed rows that predict each completion token.
            old = torch.zeros_like(logprobs)
            rows = (batch.roles == ROLE_REASONING).nonzero().squeeze(1)
            old[rows.to(device)] = torch.tensor([lp for i in mb for lp in samples[i].logprobs[:len(seqs[i].reasoning_ids)]],
                                                dtype=logprobs.dtype, device=device)
            loss = ppo_clip_loss(logprobs, old, roles, cu, advantages[mb].to(device), len(samples))
        else:
            loss = policy_gradient_loss(logprobs, roles, cu, advantages[mb].to(device), len(samples))
        loss.backward()
        sums["loss"] += loss.item()
        sums["tokens"] += batch.input_ids.numel()
    sums["reward"] += rewards.sum().item()
    sums["reward_sq"] += (rewards.double() ** 2).sum().item()
    sums["adv_sq"] += (advantages.double() ** 2).sum().item()
    sums["found"] += float(sum(not s.truncated and s.spliced[0].found for s in samples))
    sums["reasoning_len"] += float(sum(len(q.reasoning_ids) for q in seqs))
    sums["completions"] += len(samples)


def _save(out_dir, policy, optimizer, state, tokenizer, sharded, rank) -> None:
    model_state = distributed.full_model_state(policy, sharded)
    optimizer_state = optimizer.state_dict()
    if sharded:
        # Every rank stages its optimizer shard; rank 0 then completes and renames.
        stage = checkpoint.staging_dir(out_dir, state.step)
        stage.mkdir(parents=True, exist_ok=True)
        torch.save(distributed.local_optimizer_state(optimizer), stage / f"optimizer-rank{rank}.pt")
        distributed.barrier()
        optimizer_state = None
    if rank == 0:
        path = checkpoint.save(out_dir, model=policy.model, model_state=model_state,
                               optimizer_state=optimizer_state, state=state, tokenizer=tokenizer)
        log.info("checkpoint: %s", path)
    if sharded:
        distributed.barrier()
