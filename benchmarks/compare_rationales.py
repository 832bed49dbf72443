"""Reference-guided rationales against plain worked solutions, and best-of-N with the
majority verifier, on the shipped model and the built-in task (the README's
"Reference-guided rationales and best-of-N" numbers):

    python benchmarks/compare_rationales.py [--seeds 0,1,2] [--out benchmarks/results]

Runs the README's commands: `pyvf rationalize` (200 training questions, 16 rationales
each, min score 0.1) once, then for each seed `pyvf sft` on the kept rationales and
`pyvf sft --train-on worked` on the worked solutions of the same questions (60 steps of
16, greedy accuracy on 200 held-out questions), and `pyvf bon --verifier majority`
(N = 1..16 on 100 held-out questions). Writes rationales-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
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
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    rationales = work / "rationales.jsonl"
    seconds = {"rationalize": pyvf("rationalize", "--data", "synthetic", "--limit", str(args.questions),
                                   "--samples", str(args.samples), "--min-score", "0.1", "--output", str(rationales))}
    counts = json.loads((work / "rationales.jsonl.counts.json").read_text())
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
    kept = sum(1 for line in rationales.read_text().splitlines() if line.strip())

    date = datetime.date.today().isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"date": date, "torch": torch.__version__, "seeds": seeds, "questions": args.questions,
              "samples": args.samples, "sft_steps": args.steps, "eval_questions": args.eval_questions,
              "rationalize_counts": counts, "kept": kept, "accuracy": accuracy, "bon": bon, "seconds": seconds,
              "command": "python benchmarks/compare_rationales.py " + " ".join(argv or sys.argv[1:])}
    (args.out / f"rationales-{date}.json").write_text(json.dumps(result, indent=2))

    def cell(values):
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return (" / ".join(f"{100 * v:.1f}" for v in values)
                + f" (mean {100 * statistics.mean(values):.1f}% ± {100 * std:.1f})")

    lines = [f"# Reference-guided rationales and best-of-N ({date}, CPU, shipped model)", "",
             (f"{args.questions} training questions x {args.samples} rationales: {kept} kept; dropped "
              f"{counts['leak_mentions']} mentioning the reference, {counts['leak_early']} stating it early, "
              f"{counts['no_marker']} without an answer."), "",
             f"| SFT data ({args.steps} steps of 16) | held-out accuracy, seeds {args.seeds} |", "|---|---|",
             f"| kept rationales | {cell(accuracy['rationales'])} |",
             f"| worked solutions of the same questions | {cell(accuracy['worked'])} |", "",
             f"Best-of-N, verifier majority, {bon['questions']} held-out questions, temperature {bon['temperature']}:",
             "", "| N | picked | oracle |", "|---|---|---|"]
    lines += [f"| {row['n']} | {100 * row['accuracy']:.1f}% | {100 * row['oracle']:.1f}% |" for row in bon["curve"]]
    (args.out / f"rationales-{date}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
