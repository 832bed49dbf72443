"""`pyvf demo`: evaluate the built-in model on held-out questions of the synthetic task,
train it with VeriFree on the CPU, evaluate again, and print both accuracies."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from pyvf.options import add_options, from_args, option
from pyvf.train.config import from_dict
from pyvf.train.rollouts import ROLLOUT_MODES
from pyvf.train.trainer import train
from pyvf.workflows.evaluate import evaluate_path

HELP = "evaluate, train with VeriFree on the CPU, evaluate again"

# Everything else as in `pyvf train`.
TRAIN_KEYS = dict(
    model="builtin", data="synthetic", objective="verifree", prompts_per_step=8, group_size=8, max_new_tokens=48,
    lr=3e-5, micro_batch_tokens=16384, save_every=0,
)


@dataclass
class DemoOptions:
    output_dir: str = option("runs/demo", "where the run, its plot and demo.json go")
    max_steps: int = option(80, "VeriFree steps", minimum=1)
    seed: int = option(0, "seed of the run")
    eval_questions: int = option(200, "held-out questions evaluated before and after", minimum=1)
    rollout: str = option("hf", "rollout engine (vllm: see README)", choices=("hf", "vllm"))
    rollout_mode: str = option("sync", "sync, one_step_off or async: the latter two sample in an engine process "
                                       "while the trainer trains", choices=ROLLOUT_MODES)


def add_args(parser: argparse.ArgumentParser) -> None:
    add_options(parser, DemoOptions)


def main(args: argparse.Namespace) -> int:
    opts = from_args(DemoOptions, args)
    start = time.time()
    n = opts.eval_questions
    print(f"demo: evaluating the built-in model on {n} held-out questions", flush=True)
    before = evaluate_path("builtin", "synthetic", n, 64)
    print(f"demo: accuracy before training {100 * before['accuracy']:.1f}%", flush=True)
    cfg = from_dict({**TRAIN_KEYS, "output_dir": opts.output_dir, "max_steps": opts.max_steps, "seed": opts.seed,
                     "rollout": opts.rollout, "rollout_mode": opts.rollout_mode}).validate()
    print(f"demo: training with VeriFree for {cfg.max_steps} steps "
          f"({cfg.prompts_per_step} prompts x {cfg.group_size} samples, rollout engine {cfg.rollout}, "
          f"{cfg.rollout_mode}) "
          f"-> {cfg.output_dir}", flush=True)
    train(cfg)
    after = evaluate_path(str(Path(cfg.output_dir) / "checkpoints" / f"step-{cfg.max_steps:06d}"), "synthetic", n, 64)
    elapsed = time.time() - start
    summary = {"before": before["accuracy"], "after": after["accuracy"], "n": n, "seconds": elapsed,
               "config": cfg.to_dict()}
    Path(cfg.output_dir, "demo.json").write_text(json.dumps(summary, indent=2))
    print(f"demo: plot {Path(cfg.output_dir) / 'metrics.png'}")
    print(f"demo: accuracy {100 * before['accuracy']:.1f}% -> {100 * after['accuracy']:.1f}% "
          f"({n} held-out questions, {elapsed:.0f} s, rollout engine {cfg.rollout}, {cfg.rollout_mode})")
    return 0
