"""The `pyvf` command line: train, eval, demo, selfplay, bench.

Errors in what the user gave (config keys, paths, data) print one line and exit 2;
set PYVF_DEBUG=1 to see the traceback instead."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from pyvf.train.config import ConfigError

DEMO_DEFAULTS = dict(
    model="builtin", data="synthetic", objective="verifree", output_dir="runs/demo", seed=0,
    max_steps=80, prompts_per_step=8, group_size=8, max_new_tokens=48, lr=3e-5, max_seq_len=256,
    micro_batch_tokens=16384, save_every=0,
)


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(float(s)) for s in text.split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--sizes must be positive integers, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    from pyvf.train.config import TrainConfig, help_text

    parser = argparse.ArgumentParser(prog="pyvf", description="Verifier-free RL for language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train", help="train a model with a verifier-free objective",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train with VeriFree. Every config key can be given as --key value.",
        epilog="config keys (YAML/TOML file via --config, each overridable on the command line):\n" + help_text())
    train.add_argument("--config", default=None, help="YAML or TOML file of config keys")
    train.add_argument("--resume", default=None, metavar="RUN_OR_CHECKPOINT",
                       help="continue a run: its saved config, its output directory, its step budget; keys given "
                            "on the command line override the saved ones (each override is printed)")
    train.add_argument("--force-override", action="store_true",
                       help="with --resume: allow overriding what makes it another run (" +
                            ", ".join(TrainConfig.IDENTITY) + ")")

    ev = sub.add_parser("eval", help="greedy accuracy of a model on a dataset")
    ev.add_argument("--model", default="builtin", help="model directory, or builtin")
    ev.add_argument("--data", default="synthetic", help="JSONL file of question/answer rows, or synthetic (held out)")
    ev.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions")
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--prompt-template", default="", help="prompt with {question} (default: the synthetic task's)")
    ev.add_argument("--chat-template", default="auto", choices=("auto", "none"),
                    help="auto: the tokenizer's chat template when it has one")
    ev.add_argument("--system-prompt", default="")
    ev.add_argument("--assistant-prefix", default="", help="text that starts the assistant turn, e.g. <think>")
    ev.add_argument("--stop", default="</answer>", help="stop strings, | separated (\"\" for EOS only)")
    ev.add_argument("--output", default=None, help="JSON file for the result (default: eval.json)")

    demo = sub.add_parser("demo", help="evaluate, train with VeriFree on the CPU, evaluate again")
    demo.add_argument("--output-dir", default=DEMO_DEFAULTS["output_dir"])
    demo.add_argument("--max-steps", type=int, default=DEMO_DEFAULTS["max_steps"])
    demo.add_argument("--seed", type=int, default=DEMO_DEFAULTS["seed"])
    demo.add_argument("--eval-questions", type=int, default=200, help="held-out questions evaluated before and after")
    demo.add_argument("--rollout", default="hf", choices=("hf", "vllm"), help="rollout engine (vllm: see README)")

    play = sub.add_parser(
        "selfplay", help="R-Zero: challenger and solver from one base model, no labels",
        description="R-Zero self-play (pyvf/train/selfplay.py). Run it again with the same --output-dir to continue "
                    "an interrupted run, or with more --iterations to go on.")
    from pyvf.train.selfplay import SelfPlayConfig

    for f in dataclasses.fields(SelfPlayConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            play.add_argument(flag, type=lambda v: v.lower() in ("1", "true", "yes", "on"), default=f.default,
                              metavar="BOOL")
        else:
            kind = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            play.add_argument(flag, type=kind, default=f.default, help=f"(default: {f.default!r})")

    bench = sub.add_parser("bench", help="time the ops at sizes that fit this machine and print a table")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--sizes", type=_sizes, default=None,
                       help="comma-separated batch sizes, e.g. 1e4,1e6 (default: by device)")
    bench.add_argument("--output", default=None, help="also write the results as JSON to this file")
    bench.add_argument("suites", nargs="*", metavar="SUITE",
                       help="suites to run (default: grouped_advantages verifree_loss token_logprobs train_step); "
                            "one or more of pyvf.bench.SUITES, e.g. policy_loss rollout forward trainer_step")
    bench.add_argument("--impls", default=None,
                       help="comma-separated implementations, each suite keeps the ones it knows (default: all)")
    return parser


def resume_config(resume: str, values: dict, *, force: bool = False, announce=print):
    """The config of a resumed run: the one saved with the checkpoint, with `values`
    (from --config and the command line) on top. stop_after never carries over, the
    output stays in the run's directory unless output_dir is given, and changing what
    makes it another run (TrainConfig.IDENTITY) is an error unless `force`."""
    from pyvf.train import checkpoint
    from pyvf.train import config as config_mod

    saved_values = checkpoint.saved_config(resume)
    known = {f.name for f in dataclasses.fields(config_mod.TrainConfig)}
    dropped = sorted(set(saved_values) - known)
    if dropped:
        announce(f"resume: ignoring saved keys this version does not know: {', '.join(dropped)}")
    saved = config_mod.from_dict({k: v for k, v in saved_values.items() if k in known})
    for key in config_mod.TrainConfig.PER_INVOCATION:
        setattr(saved, key, getattr(config_mod.TrainConfig, key))
    saved.output_dir = str(checkpoint.run_dir(resume))
    cfg = config_mod.from_dict(values, base=saved)
    for key in sorted(values):
        name = key.replace("-", "_")
        old, new = getattr(saved, name), getattr(cfg, name)
        if old == new:
            continue
        if name in config_mod.TrainConfig.IDENTITY and not force:
            raise ConfigError(f"--resume: {name} was {old!r} in this run; overriding it to {new!r} makes another "
                              f"run (add --force-override to do it anyway)")
        announce(f"resume: {name} {old!r} -> {new!r}")
    return cfg


def _train(args, extra: list[str]) -> int:
    from pyvf.train import config as config_mod
    from pyvf.train.trainer import train

    values = config_mod.load_file(args.config) if args.config else {}
    values.update(config_mod.parse_overrides(extra))
    if args.force_override and not args.resume:
        raise ConfigError("--force-override only applies with --resume")
    if args.resume:
        cfg = resume_config(args.resume, values, force=args.force_override).validate()
    else:
        cfg = config_mod.from_dict(values).validate()
    record = train(cfg, resume=args.resume)
    if record and os.environ.get("RANK", "0") == "0":
        print(f"train: step {record['step']} loss {record['loss']:.4f} reward {record['reward_mean']:.3f} "
              f"-> {cfg.output_dir}")
    return 0


def _evaluate_path(model_spec: str, data: str, limit, max_new_tokens: int, **prompting) -> dict:
    from pyvf.data import dataset
    from pyvf.train.evaluate import evaluate
    from pyvf.train.model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_spec)
    examples = dataset.load(data, n_synthetic=limit or 500, split="eval")
    if limit is not None:
        examples = examples[:limit]
    return evaluate(model, tokenizer, examples, max_new_tokens=max_new_tokens, **prompting)


def _eval(args) -> int:
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    result = _evaluate_path(args.model, args.data, args.limit, args.max_new_tokens,
                            prompt_template=args.prompt_template, chat_template=args.chat_template,
                            system_prompt=args.system_prompt, assistant_prefix=args.assistant_prefix,
                            stop=tuple(s for s in args.stop.split("|") if s))
    print(f"eval: accuracy {100 * result['accuracy']:.1f}% ({result['correct']}/{result['n']}) "
          f"model {args.model} data {args.data}")
    output = args.output or "eval.json"
    Path(output).write_text(json.dumps(result, indent=2))
    print(f"eval: wrote {output}")
    return 0


def _demo(args) -> int:
    from pyvf.train import config as config_mod
    from pyvf.train.trainer import train

    start = time.time()
    n = args.eval_questions
    print(f"demo: evaluating the built-in model on {n} held-out questions", flush=True)
    before = _evaluate_path("builtin", "synthetic", n, 64)
    print(f"demo: accuracy before training {100 * before['accuracy']:.1f}%", flush=True)
    cfg = config_mod.from_dict({**DEMO_DEFAULTS, "output_dir": args.output_dir, "max_steps": args.max_steps,
                                "seed": args.seed, "rollout": args.rollout}).validate()
    print(f"demo: training with VeriFree for {cfg.max_steps} steps "
          f"({cfg.prompts_per_step} prompts x {cfg.group_size} samples, rollout engine {cfg.rollout}) "
          f"-> {cfg.output_dir}", flush=True)
    train(cfg)
    after = _evaluate_path(str(Path(cfg.output_dir) / "checkpoints" / f"step-{cfg.max_steps:06d}"), "synthetic", n, 64)
    elapsed = time.time() - start
    summary = {"before": before["accuracy"], "after": after["accuracy"], "n": n, "seconds": elapsed,
               "config": cfg.to_dict()}
    Path(cfg.output_dir, "demo.json").write_text(json.dumps(summary, indent=2))
    print(f"demo: plot {Path(cfg.output_dir) / 'metrics.png'}")
    print(f"demo: accuracy {100 * before['accuracy']:.1f}% -> {100 * after['accuracy']:.1f}% "
          f"({n} held-out questions, {elapsed:.0f} s, rollout engine {cfg.rollout})")
    return 0


def _selfplay(args) -> int:
    from pyvf.train.selfplay import SelfPlayConfig, selfplay

    cfg = SelfPlayConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SelfPlayConfig)})
    state = selfplay(cfg)
    for record in state["history"]:
        if "solver_accuracy" in record:
            print(f"selfplay: iteration {record['iteration']} solver held-out accuracy "
                  f"{100 * record['solver_accuracy']:.1f}%")
    print(f"selfplay: solver {state['solver']}, challenger {state['challenger']} -> {cfg.output_dir}")
    return 0


def _bench(args) -> int:
    from pyvf import bench

    unknown = sorted(set(args.suites) - set(bench.SUITES))
    if unknown:
        raise ConfigError(f"unknown suite {', '.join(unknown)}; choose from {', '.join(bench.SUITES)}")
    impls = args.impls.split(",") if args.impls else None
    known = {i for names in bench.suite_impls(args.suites or bench.DEFAULT_SUITES).values() for i in names}
    unknown = sorted(set(impls or []) - known)
    if unknown:
        raise ConfigError(f"unknown --impls {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    return bench.main(args.device, args.sizes, args.output, impls, args.suites or None)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "train":
            return _train(args, extra)
        if args.command == "eval":
            return _eval(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "selfplay":
            return _selfplay(args)
        return _bench(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        if os.environ.get("PYVF_DEBUG"):
            raise
        print(f"pyvf {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
