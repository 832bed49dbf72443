"""Compares the objectives on the built-in task with the same budget, from the
shipped demo model:

    python benchmarks/compare_objectives.py [--steps 40] [--seeds 0,1,2] [--methods ...] [--out benchmarks/results]

Rows: SFT only (the starting model), then verifree, rlpr, nover, verifier and pcl,
each trained --steps steps (8 prompts x 8 samples, lr 3e-5) per seed, and rzero: R-Zero
self-play with no labels at all (2 iterations of 5 challenger and 15 solver steps, the
official checkpoints, so also 40 optimizer steps in all; `pyvf selfplay`). Reports
held-out greedy accuracy (mean and std over seeds; PCL's model is asked with its own
prompt and stops at </answer>, as when serving) and wall time, and, at the starting
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

from pyvf.chat import stop_token_ids
from pyvf.data import dataset
from pyvf.objectives import get_objective
from pyvf.objectives.base import StepContext
from pyvf.runtime.model import load_model_and_tokenizer
from pyvf.runtime.policy import Policy
from pyvf.runtime.rollout import HFGenerate
from pyvf.train import config as config_mod
from pyvf.train.trainer import DataOrder, Prompts, accumulate_gradients, rollout, train
from pyvf.workflows.evaluate import evaluate

METHODS = ["verifree", "rlpr", "nover", "verifier", "pcl", "rzero"]
# proxy_sync_every 10: NOVER's official 100 would never sync in a 40-step run.
BASE = dict(model="builtin", data="synthetic", prompts_per_step=8, group_size=8, max_new_tokens=48, lr=3e-5,
            max_seq_len=256, micro_batch_tokens=16384, progress=False, plot=False, proxy_sync_every=10)


def held_out_accuracy(model_path: str, n: int, prompt_template: str = "") -> float:
    model, tokenizer = load_model_and_tokenizer(model_path)
    return evaluate(model, tokenizer, dataset.load("synthetic", n_synthetic=n, split="eval"), max_new_tokens=64,
                    prompt_template=prompt_template)["accuracy"]


def run(method: str, seed: int, steps: int, out: Path, n_eval: int) -> float:
    """Trains one method from the shipped model; returns its held-out accuracy."""
    if method == "rzero":
        import shutil

        from pyvf.workflows.selfplay import SelfPlayConfig, selfplay

        shutil.rmtree(out, ignore_errors=True)  # a self-play directory would otherwise be continued
        state = selfplay(SelfPlayConfig(output_dir=str(out), seed=seed, eval_questions=0, progress=False))
        return held_out_accuracy(state["solver"], n_eval)
    cfg = config_mod.from_dict({**BASE, "objective": method, "seed": seed, "max_steps": steps,
                                "output_dir": str(out)}).validate()
    train(cfg)
    template = get_objective(method).prompt_template
    return held_out_accuracy(str(out / "checkpoints" / f"step-{steps:06d}"), n_eval, template)


def gradient_noise(objective: str, batches: int) -> float:
    """tr Cov(g) / ||E g||^2 over independent rollout batches at the starting model."""
    cfg = config_mod.from_dict({**BASE, "objective": objective}).validate()
    model, tokenizer = load_model_and_tokenizer("builtin")
    policy = Policy(model, lm_head_pass=cfg.lm_head_pass)
    examples = dataset.load("synthetic", n_synthetic=cfg.n_synthetic)
    prompts = Prompts(cfg, tokenizer, examples)
    obj = get_objective(objective)(cfg, tokenizer)
    obj.attach(policy)
    obj.setup(policy, examples, prompts, torch.device("cpu"))
    engine = HFGenerate(model, tokenizer, stop_token_ids=stop_token_ids(model, tokenizer))
    indices = DataOrder(len(examples), 0).take(0, cfg.prompts_per_step)  # same prompts, independent samples
    grads = []
    for b in range(batches):
        ctx = StepContext(step=1000 + b, policy=policy, temperature=cfg.temperature, device=torch.device("cpu"))
        samples = rollout(cfg, engine, prompts, indices, 0, ctx.step)
        policy.zero_grad(set_to_none=True)
        accumulate_gradients(cfg, obj, obj.config.loss_agg, policy, samples, obj.score(samples, ctx), ctx)
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
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    rows = [{"method": "SFT only", "accuracy": [held_out_accuracy("builtin", args.eval_questions)], "seconds": [0.0]}]
    print(f"compare: SFT only {100 * rows[0]['accuracy'][0]:.1f}%", flush=True)
    for method in methods:
        accs, secs = [], []
        for seed in seeds:
            start = time.time()
            accs.append(run(method, seed, args.steps, args.workdir / f"{method}-seed{seed}", args.eval_questions))
            secs.append(time.time() - start)
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
             "| method | held-out accuracy (mean ± std) | wall time per run (with its evaluation) |", "|---|---|---|"]
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
