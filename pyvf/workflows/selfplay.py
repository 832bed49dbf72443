"""R-Zero self-play (`pyvf selfplay`; pyvf/objectives/rzero.py has the formulas): one
base model as challenger and solver, no labels. Each iteration:
    challenger phase: GRPO on the challenger's reward, the previous solver frozen
                      (a `pyvf train --objective rzero` run)
    questions:        the new challenger writes questions, the previous solver answers
                      each m times; questions with 0.3 <= p_hat <= 0.8 keep the majority
                      answer as their label (questions.jsonl)
    solver phase:     the previous solver trains on them (`--objective verifier`, or
                      `verifree`: VeriFree on the pseudo-labels)

Challenger_i starts from challenger_{i-1}, solver_i from solver_{i-1}, both from the
base model at i = 1 (as the official scripts/main.sh). Every phase writes into its own
directory under the output directory and selfplay.json records which are done, so an
interrupted run continues where it stopped (`--resume`): a training phase from its
last checkpoint, the question set from scratch (it is a pure function of the seed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pyvf.chat import render_prompt_ids, stop_token_ids
from pyvf.data import dataset
from pyvf.objectives.rzero import QUESTION_PROMPT, QUESTION_STOP, Solver, extract_question, in_band
from pyvf.options import ConfigError, add_options, check, from_args, option
from pyvf.runtime import checkpoint
from pyvf.runtime.model import load_model_and_tokenizer
from pyvf.runtime.rollout import HFGenerate, prompt_seed
from pyvf.train import config as config_mod
from pyvf.train.trainer import train
from pyvf.workflows.evaluate import evaluate

log = logging.getLogger("pyvf")

STATE_FILE = "selfplay.json"


@dataclass
class SelfPlayConfig:
    model: str = option("builtin", "the base model: both roles start from it")
    output_dir: str = option("runs/selfplay", "the run's directory; the same one continues it")
    iterations: int = option(2, "challenger + solver iterations", minimum=1)
    seed: int = option(0, "seed of every phase")
    challenger_steps: int = option(5, "challenger steps per iteration (official: its step-5 checkpoint)", minimum=1)
    solver_steps: int = option(15, "solver steps per iteration (official: its step-15 checkpoint)", minimum=1)
    questions: int = option(64, "questions the challenger writes per iteration (official 8000)", minimum=1)
    solver_samples: int = option(10, "m: solver answers per question, for the reward and the labels", minimum=1)
    band_low: float = option(0.3, "keep a question when band_low <= p_hat (its majority share)", minimum=0,
                             maximum=1)
    band_high: float = option(0.8, "... and p_hat <= band_high", minimum=0, maximum=1)
    solver_objective: str = option("verifier", "verifier (rule check against the pseudo-label) or verifree",
                                   choices=("verifier", "verifree"))
    challenger_group_size: int = option(4, "challenger samples per prompt (official n = 4)", minimum=2)
    solver_group_size: int = option(5, "solver samples per question (official n = 5)", minimum=2)
    prompts_per_step: int = option(4, "prompts per training step of either role", minimum=1)
    lr: float = option(3e-5, "learning rate of either role")
    max_new_tokens: int = option(48, "longest completion", minimum=1)
    max_seq_len: int = option(0, "longest sequence trained on (0: what a step produces)", minimum=0)
    eval_questions: int = option(200, "held-out synthetic questions to evaluate each solver on (0: none)", minimum=0)
    save_every: int = option(5, "checkpoint a training phase every N steps (and at its end)", minimum=1)
    progress: bool = option(True, "progress bars")

    def validate(self) -> "SelfPlayConfig":
        check(self)
        if self.band_low > self.band_high:
            raise ConfigError(f"band_low and band_high must satisfy 0 <= band_low <= band_high <= 1, got "
                              f"{self.band_low} and {self.band_high}")
        return self


def _write_json(path: Path, value) -> None:
    checkpoint.write_atomic(path, json.dumps(value, indent=2))


def _train_phase(cfg: SelfPlayConfig, out: Path, **keys) -> str:
    """Runs (or continues) one training phase in `out`; returns its final checkpoint."""

    values = dict(seed=cfg.seed, prompts_per_step=cfg.prompts_per_step, lr=cfg.lr, max_new_tokens=cfg.max_new_tokens,
                  max_seq_len=cfg.max_seq_len, micro_batch_tokens=16384, progress=cfg.progress, plot=False,
                  save_every=cfg.save_every, output_dir=str(out), **keys)
    train_cfg = config_mod.from_dict(values)
    try:
        resume = str(checkpoint.resolve(out))
    except ValueError:
        resume = None
    if resume and json.loads((Path(resume) / "trainer_state.json").read_text())["step"] >= train_cfg.max_steps:
        return resume  # finished before the interruption
    train(train_cfg, resume=resume)
    return str(checkpoint.resolve(out))


@torch.no_grad()
def write_questions(cfg: SelfPlayConfig, challenger: str, solver: str, path: Path, iteration: int) -> dict:
    """The challenger writes cfg.questions questions, the solver answers each m times;
    those in the band are written with their majority answer as `answer`. Returns counts."""

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model_and_tokenizer(challenger)
    model.to(device)
    engine = HFGenerate(model, tokenizer, stop_token_ids=stop_token_ids(model, tokenizer))
    prompt = render_prompt_ids(tokenizer, QUESTION_PROMPT, template="{question}")
    seeds = [prompt_seed(cfg.seed, -iteration, k) for k in range(cfg.questions)]
    written = engine.generate([prompt] * cfg.questions, 1, max_new_tokens=cfg.max_new_tokens, temperature=1.0,
                              seeds=seeds, stop=[QUESTION_STOP])
    questions = [extract_question(tokenizer.decode(c.ids, skip_special_tokens=True)) for (c,) in written]
    del model, engine
    valid = [q for q in questions if q is not None]
    unique = list(dict.fromkeys(valid))
    solver_cfg = config_mod.from_dict(dict(max_new_tokens=cfg.max_new_tokens))
    votes = Solver.load(solver, solver_cfg, device).vote(
        unique, [prompt_seed(cfg.seed, -iteration, 10**6 + k) for k in range(len(unique))], cfg.solver_samples)
    rows = [{"question": q, "answer": label, "p_hat": p} for q, (label, p) in zip(unique, votes)
            if in_band(p, label, (cfg.band_low, cfg.band_high))]
    checkpoint.write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
    return {"written": cfg.questions, "valid": len(valid), "unique": len(unique), "in_band": len(rows)}


def selfplay(cfg: SelfPlayConfig) -> dict:
    """Runs the iterations (continuing a run found in cfg.output_dir); returns the state."""

    cfg.validate()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_FILE
    state = {"config": dataclasses.asdict(cfg), "challenger": cfg.model, "solver": cfg.model, "iteration": 0,
             "phase": None, "history": []}
    if state_path.is_file():
        saved = json.loads(state_path.read_text())
        changed = {k: (v, getattr(cfg, k)) for k, v in saved["config"].items()
                   if k not in ("iterations", "progress", "eval_questions", "save_every") and getattr(cfg, k, v) != v}
        if changed:
            raise ConfigError(f"{out} holds a self-play run with other settings: "
                              + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        state = {**saved, "config": dataclasses.asdict(cfg)}
        log.info("selfplay: continuing %s after iteration %d (phase %s done)", out, state["iteration"], state["phase"])
    held_out = dataset.load("synthetic", n_synthetic=cfg.eval_questions, split="eval") if cfg.eval_questions else None
    if held_out is not None and not state["history"]:
        model, tokenizer = load_model_and_tokenizer(cfg.model)
        state["history"].append({"iteration": 0, "solver_accuracy": evaluate(model, tokenizer, held_out)["accuracy"]})
        _write_json(state_path, state)
        log.info("selfplay: base model held-out accuracy %.1f%%", 100 * state["history"][-1]["solver_accuracy"])

    def done(phase: str, **update) -> None:
        state.update(phase=phase, **update)
        _write_json(state_path, state)

    while state["iteration"] < cfg.iterations or state["phase"] not in ("solver", None):
        if state["phase"] in ("solver", None):
            state["iteration"] += 1
            state["phase"] = "start"
        i = state["iteration"]
        here = out / f"iter{i}"
        here.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        if state["phase"] == "start":
            log.info("selfplay: iteration %d/%d, challenger phase (%d steps)", i, cfg.iterations, cfg.challenger_steps)
            challenger = _train_phase(cfg, here / "challenger", objective="rzero", model=state["challenger"],
                                      solver_model=state["solver"], solver_samples=cfg.solver_samples,
                                      stop=QUESTION_STOP,
                                      group_size=cfg.challenger_group_size, max_steps=cfg.challenger_steps)
            done("challenger", challenger_next=challenger)
        if state["phase"] == "challenger":
            counts = write_questions(cfg, state["challenger_next"], state["solver"], here / "questions.jsonl", i)
            log.info("selfplay: iteration %d: %d questions written, %d well formed, %d distinct, %d in the band",
                     i, counts["written"], counts["valid"], counts["unique"], counts["in_band"])
            done("questions", questions=counts)
        if state["phase"] == "questions":
            solver = state["solver"]
            if state["questions"]["in_band"]:
                log.info("selfplay: iteration %d, solver phase (%d steps on %d questions)", i, cfg.solver_steps,
                         state["questions"]["in_band"])
                solver = _train_phase(cfg, here / "solver", objective=cfg.solver_objective, model=state["solver"],
                                      data=str(here / "questions.jsonl"), group_size=cfg.solver_group_size,
                                      max_steps=cfg.solver_steps)
            else:
                log.warning("selfplay: iteration %d: no question in the band, the solver stays as it was", i)
            record = {"iteration": i, "questions": state["questions"], "seconds": time.perf_counter() - t0}
            if held_out is not None:
                model, tokenizer = load_model_and_tokenizer(solver)
                record["solver_accuracy"] = evaluate(model, tokenizer, held_out)["accuracy"]
                log.info("selfplay: iteration %d: solver held-out accuracy %.1f%%", i, 100 * record["solver_accuracy"])
            state["history"].append(record)
            done("solver", challenger=state["challenger_next"], solver=solver)
    return state


HELP = "R-Zero: challenger and solver from one base model, no labels"
DESCRIPTION = ("R-Zero self-play (pyvf/workflows/selfplay.py). Run it again with the same --output-dir to continue "
               "an interrupted run, or with more --iterations to go on.")


def add_args(parser: argparse.ArgumentParser) -> None:
    add_options(parser, SelfPlayConfig)


def main(args: argparse.Namespace) -> int:
    cfg = from_args(SelfPlayConfig, args)
    state = selfplay(cfg)
    for record in state["history"]:
        if "solver_accuracy" in record:
            print(f"selfplay: iteration {record['iteration']} solver held-out accuracy "
                  f"{100 * record['solver_accuracy']:.1f}%")
    print(f"selfplay: solver {state['solver']}, challenger {state['challenger']} -> {cfg.output_dir}")
    return 0
