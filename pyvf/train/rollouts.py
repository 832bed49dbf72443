"""Where a step's first sampling round comes from.

`rollout`: sampled now, with the weights the trainer holds (rollout_mode sync).
`AheadRollouts`: sampled by engine processes ahead of the step that trains on it, while
earlier steps train (rollout_mode one_step_off and async):

- one_step_off: batch t+1 is submitted when step t starts, to be generated with exactly
  the weights after step t-1; every batch after the first is one version behind, so a
  run is reproducible, and a checkpoint keeps the batch in flight (it resumes bit-exactly).
- async: the prompts of steps t .. t + max_staleness are in flight; an engine takes the
  newest weights it has when it starts a request, never older than max_staleness versions
  behind the step that will train on it. A group that is older anyway when its step
  takes it (max_staleness lowered on resume) is dropped, counted and sampled again. A
  checkpoint keeps the prompts in flight, which a resumed run samples again: no prompt is
  lost or repeated.

The step's later rounds (a group filter's refills, PCL's continuation) are sampled when
the step needs them, with the newest weights.
"""

from __future__ import annotations

import logging

from pyvf.objectives.base import Sample
from pyvf.runtime.rollout import prompt_seed
from pyvf.runtime.rollout.base import Completion

log = logging.getLogger("pyvf")

ROLLOUT_MODES = ("sync", "one_step_off", "async")


def rollout_inputs(cfg, prompts, indices: list[int], first_group: int, step: int) -> tuple[list[list[int]], list[int]]:
    """(prompt ids, seeds) of prompts `indices`; prompt j is group first_group + j, and its
    samples depend only on (seed, step, group), never on the rank, the batch or the mode."""
    return [prompts[i] for i in indices], [prompt_seed(cfg.seed, step, first_group + j) for j in range(len(indices))]


def make_samples(prompts, indices: list[int], prompt_ids: list[list[int]], outputs: list[list[Completion]],
                 first_group: int, engine_on_policy: bool) -> list[Sample]:
    return [Sample(idx, prompts.examples[idx], prompt_ids[j], c.ids, c.finish, c.logprobs, first_group + j,
                   policy_version=c.policy_version, engine_on_policy=engine_on_policy)
            for j, idx in enumerate(indices) for c in outputs[j]]


def generate_kwargs(cfg) -> dict:
    return dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, stop=cfg.stop_strings())


def rollout(cfg, engine, prompts, indices: list[int], first_group: int, step: int) -> list[Sample]:
    """G samples of each prompt, now."""
    prompt_ids, seeds = rollout_inputs(cfg, prompts, indices, first_group, step)
    outputs = engine.generate(prompt_ids, cfg.group_size, seeds=seeds, **generate_kwargs(cfg))
    return make_samples(prompts, indices, prompt_ids, outputs, first_group, getattr(engine, "on_policy", True))


class AheadRollouts:
    """The first round of coming steps, in flight on `engine` (pyvf.runtime.rollout.remote
    .EngineProcesses) while earlier steps train. Trainer rank `rank` of `world` takes its
    share of each step's prompts (groups rank * P / world onwards), as in sync mode."""

    def __init__(self, cfg, engine, prompts, order, state, rank: int = 0, world: int = 1):
        self.cfg, self.engine, self.prompts, self.order, self.state = cfg, engine, prompts, order, state
        self.rank, self.world = rank, world
        self.share = cfg.prompts_per_step // world
        self.first_group = rank * self.share
        self.pending: dict[int, dict] = {}  # step -> {indices, version, exact, ticket | completions}

    def _submit(self, step: int, indices: list[int], version: int, exact: bool) -> dict:
        prompt_ids, seeds = rollout_inputs(self.cfg, self.prompts, indices, self.first_group, step)
        ticket = self.engine.submit(prompt_ids, self.cfg.group_size, seeds=seeds, version=version, exact=exact,
                                    **generate_kwargs(self.cfg))
        return {"indices": indices, "version": version, "exact": exact, "ticket": ticket, "completions": None}

    def _new(self, step: int) -> None:
        """Takes step's prompts from the data order and submits this rank's share."""
        cfg = self.cfg
        everyone = self.order.take(self.state.data_position, cfg.prompts_per_step)
        self.state.data_position += cfg.prompts_per_step
        indices = everyone[self.first_group:self.first_group + self.share]
        published = self.engine.version
        if cfg.rollout_mode == "one_step_off":
            self.pending[step] = self._submit(step, indices, published, True)
        else:  # the oldest weights step may be sampled with; an engine takes newer ones when it has them
            self.pending[step] = self._submit(step, indices, max(0, min(published, step - 1 - cfg.max_staleness)),
                                              False)

    @property
    def lead(self) -> int:
        """How many steps the mode samples ahead of the one training: one_step_off 1,
        async max_staleness."""
        return 1 if self.cfg.rollout_mode == "one_step_off" else self.cfg.max_staleness

    def fill(self, first: int, last: int) -> None:
        """Submits the batch of every step from `first` through `last` (and max_steps) that
        has none in flight, in step order (the data order's), with the weights published
        now: the trainer calls it for its step t when nothing is in flight for it (the first
        step, a resume), and for t + 1 .. t + lead once step t's own engine work
        (continuations, refills) is done, so it never queues behind them."""
        for s in range(first, min(last, self.cfg.max_steps) + 1):
            if s not in self.pending:
                self._new(s)

    def _completions(self, entry: dict) -> tuple[list[list[Completion]], dict]:
        if entry["completions"] is not None:
            return entry["completions"], {"wait_s": 0.0, "engine_idle_s": 0.0, "engine_busy_s": 0.0}
        return self.engine.result(entry["ticket"])

    def take(self, step: int) -> tuple[list[Sample], dict]:
        """Step's first round (waits for it), and {dropped_groups, wait_s, engine_idle_s,
        engine_busy_s}.
        Async drops groups sampled more than max_staleness versions behind and samples them
        again with the newest weights."""
        cfg = self.cfg
        entry = self.pending.pop(step)
        outputs, info = self._completions(entry)
        indices = entry["indices"]
        current = step - 1
        info["dropped_groups"] = 0
        if cfg.rollout_mode == "async":
            old = [j for j, group in enumerate(outputs) if current - group[0].policy_version > cfg.max_staleness]
            if old:
                info["dropped_groups"] = len(old)
                prompt_ids, seeds = rollout_inputs(cfg, self.prompts, indices, self.first_group, step)
                again = self.engine.submit([prompt_ids[j] for j in old], cfg.group_size,
                                           seeds=[seeds[j] for j in old], version=self.engine.version, exact=True,
                                           urgent=True, **generate_kwargs(cfg))
                fresh, more = self.engine.result(again)
                for j, group in zip(old, fresh):
                    outputs[j] = group
                for key in ("wait_s", "engine_idle_s", "engine_busy_s"):
                    info[key] += more[key]
        prompt_ids = [self.prompts[i] for i in indices]
        return make_samples(self.prompts, indices, prompt_ids, outputs, self.first_group, self.engine.on_policy), info

    # -- checkpoint -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's batches in flight, as a checkpoint keeps them: one_step_off waits for
        them and keeps their completions (the resumed run trains on exactly these); async
        keeps their prompts (sampled again by the resumed run)."""
        pending = []
        for step in sorted(self.pending):
            entry = self.pending[step]
            kept = {"step": step, "indices": list(entry["indices"]), "version": entry["version"], "completions": None}
            if self.cfg.rollout_mode == "one_step_off":
                if entry["completions"] is None:
                    entry["completions"], _ = self.engine.result(entry["ticket"])
                kept["completions"] = [[(list(c.ids), c.finish, list(c.logprobs), c.policy_version) for c in group]
                                       for group in entry["completions"]]
            pending.append(kept)
        return {"pending": pending}

    def load_state_dict(self, state: dict) -> None:
        """Restores the batches in flight of a checkpoint ({"mode", "ranks": [each trainer
        rank's state_dict]}) on a fresh engine, whose only version is the resumed step's:
        kept completions as they were (same mode, same number of ranks), otherwise their
        prompts, split among this run's ranks and sampled again."""
        ranks = (state or {}).get("ranks") or []
        if not any(r["pending"] for r in ranks):
            return
        same = state.get("mode") == self.cfg.rollout_mode == "one_step_off" and len(ranks) == self.world
        if same:
            for kept in ranks[self.rank]["pending"]:
                completions = [[Completion(list(ids), finish, list(lp), policy_version=version)
                                for ids, finish, lp, version in group] for group in kept["completions"]]
                self.pending[int(kept["step"])] = {"indices": [int(i) for i in kept["indices"]],
                                                   "version": kept["version"], "exact": True, "ticket": None,
                                                   "completions": completions}
            return
        steps = sorted({int(k["step"]) for r in ranks for k in r["pending"]})
        for step in steps:
            everyone = [int(i) for r in ranks for k in r["pending"] if int(k["step"]) == step for i in k["indices"]]
            mine = everyone[self.first_group:self.first_group + self.share]
            self.pending[step] = self._submit(step, mine, self.engine.version, self.cfg.rollout_mode != "async")
        if self.rank == 0 and state.get("mode") == "one_step_off":
            log.info("rollouts: the checkpoint's batches in flight are sampled again (it ran %s on %d rank(s), this "
                     "run %s on %d)", state.get("mode"), len(ranks), self.cfg.rollout_mode, self.world)
