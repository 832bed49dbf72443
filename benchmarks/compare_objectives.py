"""Compares the objectives on the built-in task with the same budget, from the
shipped demo model:

    python benchmarks/compare_objectives.py [--steps 40] [--seeds 0,1,2] [--out benchmarks/results]

Rows: SFT only (the starting model), then verifree, rlpr, nover and verifier, each
trained --steps steps (8 prompts x 8 samples, lr 3e-5) per seed. Reports held-out
greedy accuracy (mean and std over seeds) and wall time, and, at the starting
checkpoint, the variance of the policy-gradient estimate across independent rollout
batches for verifree versus verifier: the trace of the gradients' covariance,
relative to the squared norm of their mean (lower is a less noisy estimator).
Writes objectives-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from pyvf.data import dataset
from pyvf.objectives import OBJECTIVES
from pyvf.train import config as config_mod
from pyvf.train.evaluate import evaluate
from pyvf.train.model import PolicyLogprobs, load_model_and_tokenizer
from pyvf.train.rollout import HFGenerate
from pyvf.train.trainer import DataOrder, accumulate_gradients, collect_rollout, new_sums, train

METHODS = ["verifree", "rlpr", "nover", "verifier"]
BASE = dict(model="builtin", data="synthetic", prompts_per_step=8, group_size=8, max_new_tokens=48, lr=3e-5,
            max_seq_len=256, micro_batch_tokens=16384, progress=False, plot=False)


def held_out_accuracy(model_path: str, n: int) -> float:
    model, tokenizer = load_model_and_tokenizer(model_path)
    return evaluate(model, tokenizer, dataset.load("synthetic", n_synthetic=n, split="eval"), max_new_tokens=64)[
        "accuracy"]


def gradient_noise(objective: str, batches: int) -> float:
    """tr Cov(g) / ||E g||^2 over independent rollout batches at the starting model."""
    cfg = config_mod.from_dict({**BASE, "objective": objective}).validate()
    model, tokenizer = load_model_and_tokenizer("builtin")
    policy = PolicyLogprobs(model)
    obj = OBJECTIVES[objective](tokenizer, policy=policy) if objective != "verifree" else None
    engine = HFGenerate(model, tokenizer)
    examples = dataset.load("synthetic", n_synthetic=cfg.n_synthetic)
    order = DataOrder(len(examples), 0)
    grads = []
    for b in range(batches):
        idx = order.take(0, cfg.prompts_per_step)  # same prompts, independent samples
        rollout = collect_rollout(cfg, engine, tokenizer, examples, idx, 0, step=1000 + b)
        policy.zero_grad(set_to_none=True)
        accumulate_gradients(cfg, obj, policy, rollout, 1000 + b, torch.device("cpu"), new_sums(rollout))
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None]).double())
    g = torch.stack(grads)
    mean = g.mean(0)
    return float(((g - mean) ** 2).sum(1).mean() / (mean.norm() ** 2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--eval-questions", type=int, default=200)
    parser.add_argument("--variance-batches", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--workdir", type=Path, default=Path("runs/compare"))
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = [{"method": "SFT only", "accuracy": [held_out_accuracy("builtin", args.eval_questions)], "seconds": [0.0]}]
    print(f"compare: SFT only {100 * rows[0]['accuracy'][0]:.1f}%", flush=True)
    for method in METHODS:
        accs, secs = [], []
        for seed in seeds:
            out = args.workdir / f"{method}-seed{seed}"
            cfg = config_mod.from_dict({**BASE, "objective": method, "seed": seed, "max_steps": args.steps,
                                        "output_dir": str(out)}).validate()
            start = time.time()
            train(cfg)
            secs.append(time.time() - start)
            accs.append(held_out_accuracy(str(out / "checkpoints" / f"step-{args.steps:06d}"), args.eval_questions))
            print(f"compare: {method} seed {seed}: {100 * accs[-1]:.1f}% in {secs[-1]:.0f} s", flush=True)
        rows.append({"method": method, "accuracy": accs, "seconds": secs})
    noise = {m: gradient_noise(m, args.variance_batches) for m in ("verifree", "verifier")}
    print(f"compare: gradient noise {noise}", flush=True)

    date = datetime.date.today().isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"date": date, "torch": torch.__version__, "steps": args.steps, "seeds": seeds,
              "eval_questions": args.eval_questions, "config": BASE, "rows": rows, "gradient_noise": noise,
              "command": "python benchmarks/compare_objectives.py " + " ".join(argv or sys.argv[1:])}
    (args.out / f"objectives-{date}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Objectives on the built-in task ({date}, CPU, {args.steps} steps, seeds {args.seeds})", "",
             "| method | held-out accuracy (mean ± std) | wall time per run |", "|---|---|---|"]
    for r in rows:
        acc = r["accuracy"]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        lines.append(f"| {r['method']} | {100 * statistics.mean(acc):.1f}% ± {100 * std:.1f} | "
                     f"{statistics.mean(r['seconds']):.0f} s |")
    lines += ["", "Policy-gradient noise at the starting model, tr Cov(g) / ||E g||^2 over "
              f"{args.variance_batches} independent rollout batches: "
              + ", ".join(f"{m} {v:.2f}" for m, v in noise.items())]
    (args.out / f"objectives-{date}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
