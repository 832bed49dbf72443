"""Reference-guided rationales against plain worked solutions, and best-of-N with the
majority verifier, on the shipped model and the built-in task (the README's
"Reference-guided rationales and best-of-N" numbers):

    python benchmarks/compare_rationales.py [--seeds 0,1,2] [--out benchmarks/results]

Runs the README's commands: `pyvf rationalize` (200 training questions, 16 rationales
each, min score 0.1) once, then for each seed `pyvf sft` on the kept rationales and
`pyvf sft --train-on worked` on the worked solutions of the same questions (60 steps of
16, greedy accuracy on 200 held-out questions), and `pyvf bon --verifier majority`
(N = 1..16 on 100 held-out questions), with the same samples split by kind of question
(the warm-up's shortcut habit is strong on some kinds and weak on others). Writes
rationales-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def pyvf(*args: str) -> float:
    """Runs `pyvf ARGS` (its output passes through); returns the wall time."""
    start = time.time()
    command = [sys.executable, "-m", "pyvf.cli", *args]
    print("compare_rationales: " + " ".join(["pyvf", *args]), flush=True)
    subprocess.run(command, check=True)
    return time.time() - start


def majority_by_kind(n_questions: int, ns: list[int]) -> dict[str, dict]:
    """For all questions ("all") and per kind of question: the best-of-N curve with the
    majority verifier and the accuracy of a single sample (the mean over all samples),
    from one sampling with `pyvf bon`'s defaults (seed 0, temperature 1, 64 new tokens,
    stop at </answer>)."""
    from pyvf.data import dataset
    from pyvf.data.synthetic import generate
    from pyvf.runtime.model import load_model_and_tokenizer
    from pyvf.verify import get_verifier
    from pyvf.workflows import bon

    examples = dataset.load("synthetic", n_synthetic=n_questions, split="eval")[:n_questions]
    kinds = [p.template for p in generate(n_questions, seed=dataset.SYNTHETIC_EVAL_SEED)]
    model, tokenizer = load_model_and_tokenizer("builtin")
    prompts, completions = bon.sample_completions(model, tokenizer, examples, max(ns))
    references = [list(ex.answers) for ex in examples]
    result = {}
    for kind in ["all", *sorted(set(kinds))]:
        rows = [i for i, k in enumerate(kinds) if kind in ("all", k)]
        correct = [bon.rule_correctness(c, references[i]) for i in rows for c in completions[i][:max(ns)]]
        result[kind] = {
            "questions": len(rows), "sample_accuracy": sum(correct) / len(correct),
            "curve": bon.best_of_n_curve([prompts[i] for i in rows], [completions[i] for i in rows],
                                         [references[i] for i in rows], ns, get_verifier("majority"))}
    return result


def worked_verbatim(rows_path: Path) -> int:
    """How many kept rationales are their question's worked solution word for word."""
    from pyvf.workflows.sft import read_rows, worked_solution_rows

    rows = read_rows(rows_path)
    worked = worked_solution_rows([r["question"] for r in rows])
    return sum(r["completion"].strip() == w["completion"].strip() for r, w in zip(rows, worked))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--questions", type=int, default=200, help="training questions to write rationales for")
    parser.add_argument("--samples", type=int, default=16, help="rationales per question")
    parser.add_argument("--steps", type=int, default=60, help="SFT steps of 16")
    parser.add_argument("--eval-questions", type=int, default=200)
    parser.add_argument("--bon-questions", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--workdir", type=Path, default=Path("runs/compare-rationales"))
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not seeds:
        parser.error("--seeds must name at least one seed")
    for name in ("questions", "samples", "steps", "eval_questions", "bon_questions"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    from pyvf.workflows.rationalize import counts_path
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    rationales = work / "rationales.jsonl"
    seconds = {"rationalize": pyvf("rationalize", "--data", "synthetic", "--limit", str(args.questions),
                                   "--samples", str(args.samples), "--min-score", "0.1", "--output", str(rationales))}
    counts = json.loads(counts_path(rationales).read_text())
    accuracy: dict[str, list[float]] = {"rationales": [], "worked": []}
    for seed in seeds:
        for train_on in ("rationales", "worked"):
            out = work / f"sft-{train_on}-seed{seed}"
            extra = ["--train-on", "worked"] if train_on == "worked" else []
            seconds[f"sft-{train_on}-seed{seed}"] = pyvf(
                "sft", "--data", str(rationales), *extra, "--steps", str(args.steps), "--seed", str(seed),
                "--eval-questions", str(args.eval_questions), "--output-dir", str(out))
            accuracy[train_on].append(json.loads((out / "sft.json").read_text())["eval"]["accuracy"])
    bon_dir = work / "bon"
    seconds["bon"] = pyvf("bon", "--data", "synthetic", "--n", "1,2,4,8,16", "--verifier", "majority",
                          "--limit", str(args.bon_questions), "--output-dir", str(bon_dir))
    bon = json.loads((bon_dir / "bon.json").read_text())
    by_kind = majority_by_kind(args.bon_questions, [row["n"] for row in bon["curve"]])
    if by_kind["all"]["curve"] != bon["curve"]:
        print("compare_rationales: warning: the per-kind samples differ from `pyvf bon`'s (its defaults changed?)",
              file=sys.stderr)
    kept = sum(1 for line in rationales.read_text().splitlines() if line.strip())
    verbatim = worked_verbatim(rationales) if kept else 0

    date = datetime.date.today().isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"date": date, "torch": torch.__version__, "seeds": seeds, "questions": args.questions,
              "samples": args.samples, "sft_steps": args.steps, "eval_questions": args.eval_questions,
              "rationalize_counts": counts, "kept": kept, "kept_verbatim_worked": verbatim, "accuracy": accuracy,
              "bon": bon, "bon_by_kind": by_kind, "seconds": seconds,
              "command": shlex.join(["python", "benchmarks/compare_rationales.py",
                                     *(sys.argv[1:] if argv is None else argv)])}
    (args.out / f"rationales-{date}.json").write_text(json.dumps(result, indent=2))

    def cell(values):
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return (" / ".join(f"{100 * v:.1f}" for v in values)
                + f" (mean {100 * statistics.mean(values):.1f}% ± {100 * std:.1f})")

    lines = [f"# Reference-guided rationales and best-of-N ({date}, CPU, shipped model)", "",
             (f"{args.questions} training questions x {args.samples} rationales: {kept} kept; dropped "
              f"{counts['leak_mentions']} mentioning the reference, {counts['leak_early']} stating it early, "
              f"{counts['no_marker']} without an answer; {verbatim} of the kept ones are the worked solution word "
              f"for word."), "",
             f"| SFT data ({args.steps} steps of 16) | held-out accuracy, seeds {args.seeds} |", "|---|---|",
             f"| kept rationales | {cell(accuracy['rationales'])} |",
             f"| worked solutions of the same questions | {cell(accuracy['worked'])} |", "",
             f"Best-of-N, verifier majority, {bon['questions']} held-out questions, temperature {bon['temperature']}:",
             "", "| N | picked | oracle |", "|---|---|---|"]
    lines += [f"| {row['n']} | {100 * row['accuracy']:.1f}% | {100 * row['oracle']:.1f}% |" for row in bon["curve"]]
    last = bon["curve"][-1]["n"]
    lines += ["", f"The same samples by kind of question (majority's pick among {last} against one sample):", "",
              f"| kind | questions | one sample | majority of {last} | oracle of {last} |", "|---|---|---|---|---|"]
    lines += [f"| {kind} | {row['questions']} | {100 * row['sample_accuracy']:.1f}% | "
              f"{100 * row['curve'][-1]['accuracy']:.1f}% | {100 * row['curve'][-1]['oracle']:.1f}% |"
              for kind, row in by_kind.items()]
    (args.out / f"rationales-{date}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
