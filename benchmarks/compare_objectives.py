"""Compares the objectives on the built-in task with the same budget, from the
shipped demo model:

    python benchmarks/compare_objectives.py [--steps 40] [--seeds 0,1,2] [--methods ...] [--out benchmarks/results]
    python benchmarks/compare_objectives.py --methods verifree,verifree-logprob,verifree-mean_logprob,jepo \
        --tasks short,long --variance-batches 0 --name likelihood

Rows: SFT only (the starting model), then verifree, rlpr, nover, verifier and pcl,
each trained --steps steps (8 prompts x 8 samples, lr 3e-5) per seed, and rzero: R-Zero
self-play with no labels at all (2 iterations of 5 challenger and 15 solver steps, the
official checkpoints, so also 40 optimizer steps in all; `pyvf selfplay`). Reports
held-out greedy accuracy (mean and std over seeds; PCL's model is asked with its own
prompt and stops at </answer>, as when serving) and wall time, and, at the starting
checkpoint, the variance of the policy-gradient estimate across independent rollout
batches for verifree versus verifier: the trace of the gradients' covariance,
relative to the squared norm of their mean (lower is a less noisy estimator).

Rollout modes: `<method>@<mode>` trains with rollout_mode <mode> (one_step_off, async:
an engine process samples while the trainer trains), e.g.

    python benchmarks/compare_objectives.py --methods verifree,verifree@one_step_off,verifree@async \
        --variance-batches 0 --name rollout-modes

The likelihood rewards: `verifree-<form>` is VeriFree with `reward_form` <form>
(logprob, mean_logprob, mean_prob), `jepo` the JEPO objective. `--tasks long` trains on
`synthetic-long` (the worked solution as the reference) and reports, on held-out
questions, the short task's accuracy on the final number of the model's answer and the
reference's per-token log-likelihood after the model's own reasoning
(`pyvf.workflows.evaluate.evaluate_long`); every row also gives the completion length
at the first and the last step. Writes objectives[-<name>]-<date>.json and .md.
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
from pyvf.train.rollouts import ROLLOUT_MODES
from pyvf.train.trainer import DataOrder, Prompts, accumulate_gradients, rollout, train
from pyvf.workflows.evaluate import evaluate, evaluate_long

METHODS = ["verifree", "rlpr", "nover", "verifier", "pcl", "rzero", "verifree-logprob", "verifree-mean_logprob",
           "verifree-mean_prob", "jepo"]
TASKS = {"short": "synthetic", "long": "synthetic-long"}
# proxy_sync_every 10: NOVER's official 100 would never sync in a 40-step run.
BASE = dict(model="builtin", data="synthetic", prompts_per_step=8, group_size=8, max_new_tokens=48, lr=3e-5,
            max_seq_len=256, micro_batch_tokens=16384, progress=False, plot=False, proxy_sync_every=10)


def held_out(model_path: str, n: int, task: str = "short", prompt_template: str = "") -> dict:
    """{"accuracy"} on the short task; {"accuracy" (final number), "reference_loglik"} on the long one."""
    model, tokenizer = load_model_and_tokenizer(model_path)
    if task == "long":
        result = evaluate_long(model, tokenizer, dataset.load("synthetic-long", n_synthetic=n, split="eval"),
                               dataset.load("synthetic", n_synthetic=n, split="eval"), max_new_tokens=64,
                               prompt_template=prompt_template)
        return {"accuracy": result["accuracy"], "reference_loglik": result["reference_loglik"]}
    return {"accuracy": evaluate(model, tokenizer, dataset.load("synthetic", n_synthetic=n, split="eval"),
                                 max_new_tokens=64, prompt_template=prompt_template)["accuracy"]}


def run(method: str, seed: int, steps: int, out: Path, n_eval: int, task: str = "short") -> dict:
    """Trains one method from the shipped model; returns its held-out metrics and its
    completion length at the first and last step."""
    if method == "rzero":
        import shutil

        from pyvf.workflows.selfplay import SelfPlayConfig, selfplay

        shutil.rmtree(out, ignore_errors=True)  # a self-play directory would otherwise be continued
        state = selfplay(SelfPlayConfig(output_dir=str(out), seed=seed, eval_questions=0, progress=False))
        return held_out(state["solver"], n_eval)
    method, _, mode = method.partition("@")
    objective, _, form = method.partition("-")
    keys = {"reward_form": form} if form else {}
    if mode:
        keys["rollout_mode"] = mode
    cfg = config_mod.from_dict({**BASE, "objective": objective, "seed": seed, "max_steps": steps,
                                "output_dir": str(out), "data": TASKS[task], **keys}).validate()
    train(cfg)
    template = get_objective(objective).prompt_template
    result = held_out(str(out / "checkpoints" / f"step-{steps:06d}"), n_eval, task, template)
    with open(out / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    result["reasoning_len"] = (records[0]["reasoning_len"], records[-1]["reasoning_len"])
    return result


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
    parser.add_argument("--variance-batches", type=int, default=8, help="0: no gradient-noise measure")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--workdir", type=Path, default=Path("runs/compare"))
    parser.add_argument("--methods", default=",".join(METHODS[:6]))
    parser.add_argument("--tasks", default="short", help="short, long or both (short,long)")
    parser.add_argument("--name", default="", help="names the result files objectives-NAME-DATE")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    tasks = args.tasks.split(",")
    modes = {m.partition("@")[2] for m in methods} - {""}
    unknown = (sorted({m.partition("@")[0] for m in methods} - set(METHODS)) + sorted(modes - set(ROLLOUT_MODES))
               + sorted(set(tasks) - set(TASKS)))
    if unknown:
        parser.error(f"unknown {', '.join(unknown)}; --methods from {', '.join(METHODS)} (each with @mode, a mode "
                     f"from {', '.join(ROLLOUT_MODES)}), --tasks from {', '.join(TASKS)}")
    rows = []
    for task in tasks:
        start_model = held_out("builtin", args.eval_questions, task)
        rows.append({"method": "SFT only", "task": task, "seconds": [0.0],
                     **{k: [v] for k, v in start_model.items()}})
        print(f"compare: SFT only ({task}) {start_model}", flush=True)
        for method in methods:
            results, secs = [], []
            for seed in seeds:
                start = time.time()
                results.append(run(method, seed, args.steps, args.workdir / f"{method}-{task}-seed{seed}",
                                   args.eval_questions, task))
                secs.append(time.time() - start)
                print(f"compare: {method} ({task}) seed {seed}: {results[-1]} in {secs[-1]:.0f} s", flush=True)
            rows.append({"method": method, "task": task, "seconds": secs,
                         **{k: [r[k] for r in results] for k in results[0]}})
    noise = ({m: gradient_noise(m, args.variance_batches) for m in ("verifree", "verifier")}
             if args.variance_batches else {})
    if noise:
        print(f"compare: gradient noise {noise}", flush=True)

    date = datetime.date.today().isoformat()
    stem = f"objectives-{args.name}-{date}" if args.name else f"objectives-{date}"
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"date": date, "torch": torch.__version__, "steps": args.steps, "seeds": seeds,
              "eval_questions": args.eval_questions, "config": BASE, "rows": rows, "gradient_noise": noise,
              "command": "python benchmarks/compare_objectives.py " + " ".join(argv or sys.argv[1:])}
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))

    def mean_std(values, scale=1.0, digits=1):
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{scale * statistics.mean(values):.{digits}f} ± {scale * std:.{digits}f}"

    lines = [f"# Objectives on the built-in tasks ({date}, CPU, {args.steps} steps, seeds {args.seeds})", "",
             "| method | task | held-out accuracy, % (mean ± std) | reference log-likelihood per token | "
             "completion tokens, first -> last step | wall time per run |", "|---|---|---|---|---|---|"]
    for r in rows:
        loglik = mean_std(r["reference_loglik"], digits=3) if "reference_loglik" in r else ""
        length = (f"{statistics.mean(a for a, _ in r['reasoning_len']):.1f} -> "
                  f"{statistics.mean(b for _, b in r['reasoning_len']):.1f}") if "reasoning_len" in r else ""
        lines.append(f"| {r['method']} | {r['task']} | {mean_std(r['accuracy'], 100)} | {loglik} | {length} | "
                     f"{statistics.mean(r['seconds']):.0f} s |")
    if noise:
        lines += ["", "Policy-gradient noise at the starting model, tr Cov(g) / ||E g||^2 over "
                  f"{args.variance_batches} independent rollout batches: "
                  + ", ".join(f"{m} {v:.2f}" for m, v in noise.items())]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
