"""The `pyvf` command line: train, eval, demo, selfplay, rationalize, sft, bon, bench.

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

    rat = sub.add_parser(
        "rationalize", help="RAVR: rationales written with the reference in view, scored without it; best kept",
        description="Samples --samples rationales per question with the reference answer in the prompt, drops those "
                    "that give it away (pyvf.train.rationalize.leak_reason) or have no answer marker, scores the "
                    "rest by pi(reference | plain prompt, rationale) and writes the best per question as JSONL rows "
                    "for pyvf sft (counts in OUTPUT.counts.json).")
    rat.add_argument("--model", default="builtin", help="model directory, or builtin")
    rat.add_argument("--data", default="synthetic",
                     help="JSONL file of question/answer rows, or synthetic (its training split)")
    rat.add_argument("--output", default="rationales.jsonl", help="JSONL file for the kept rationales")
    rat.add_argument("--samples", type=int, default=4, help="rationales sampled per question (K)")
    rat.add_argument("--limit", type=int, default=None, help="only the first N questions (synthetic: default 500)")
    rat.add_argument("--min-score", type=float, default=0.0,
                     help="keep a question's best rationale only when it scores at least this")
    rat.add_argument("--select", default="score_x_plausibility", choices=("score", "score_x_plausibility"),
                     help="how a question's best rationale is chosen: pi(reference | prompt, rationale) alone, or "
                          "times the rationale's geometric-mean token probability after the plain prompt")
    _add_sampling_args(rat)

    sft = sub.add_parser(
        "sft", help="supervised fine-tuning on question/completion rows (e.g. pyvf rationalize's output)",
        description="Trains on the completion (and EOS) tokens of each row after its prompt, rendered as training "
                    "renders it; saves a model directory for pyvf eval --model. --train-on worked trains on the "
                    "synthetic task's worked solutions of the same questions instead (the plain SFT baseline).")
    sft.add_argument("--model", default="builtin", help="model directory to start from, or builtin")
    sft.add_argument("--data", required=True, help="JSONL file of rows with question and completion")
    sft.add_argument("--train-on", default="completion", choices=("completion", "worked"),
                     help="completion: the rows' completions; worked: the synthetic task's worked solutions of the "
                          "rows' questions")
    sft.add_argument("--output-dir", default="runs/sft", help="where the fine-tuned model directory is written")
    sft.add_argument("--steps", type=int, default=200)
    sft.add_argument("--lr", type=float, default=1e-4)
    sft.add_argument("--batch-size", type=int, default=16)
    sft.add_argument("--seed", type=int, default=0)
    sft.add_argument("--max-seq-len", type=int, default=512)
    sft.add_argument("--eval-questions", type=int, default=0,
                     help="after training, greedy accuracy on this many held-out questions of --eval-data "
                          "(written to OUTPUT_DIR/eval.json)")
    sft.add_argument("--eval-data", default="synthetic")
    _add_prompt_args(sft)

    bon = sub.add_parser(
        "bon", help="best-of-N: accuracy as N grows when a verifier picks one of N samples",
        description="Samples max(N) completions per question once, lets the verifier pick one of the first N for "
                    "each N, prints a table and writes OUTPUT_DIR/bon.json and bon.png.")
    bon.add_argument("--model", default="builtin", help="model directory, or builtin")
    bon.add_argument("--data", default="synthetic", help="JSONL file, synthetic or openended (held-out split)")
    bon.add_argument("--n", default="1,2,4,8,16", help="comma-separated N, increasing")
    bon.add_argument("--verifier", default="majority",
                     help="a pyvf.verify spec: rule, majority, self_rubric, verifree, python:mod:fn, or a weighted "
                          "sum such as 'majority + 0.5*verifree'")
    bon.add_argument("--rubric", default=None, help="for self_rubric: a rubric YAML or built-in name "
                                                    "(default with --data openended: story)")
    bon.add_argument("--limit", type=int, default=100, help="number of held-out questions")
    bon.add_argument("--output-dir", default="runs/bon")
    _add_sampling_args(bon, default_stop=None)

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


def _add_prompt_args(parser) -> None:
    parser.add_argument("--prompt-template", default=None,
                        help="task prompt with {question} (default: the task's: synthetic, or openended's)")
    parser.add_argument("--chat-template", default="auto", choices=("auto", "none"),
                        help="auto: the tokenizer's chat template when it has one")
    parser.add_argument("--system-prompt", default="")
    parser.add_argument("--assistant-prefix", default="", help="text that starts the assistant turn, e.g. <think>")


def _add_sampling_args(parser, *, default_stop: str | None = "</answer>") -> None:
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16, help="questions sampled together")
    parser.add_argument("--max-seq-len", type=int, default=512, help="longest sequence scored")
    if default_stop is None:
        parser.add_argument("--stop", default=None,
                            help="stop strings, | separated (default: </answer>; </rating> for openended)")
    _add_prompt_args(parser)


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


def _positive(args, *names) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _prompting(args, data: str = "synthetic") -> dict:
    from pyvf.train.bon import task_defaults

    template = args.prompt_template if args.prompt_template is not None else task_defaults(data)[0]
    return dict(prompt_template=template, chat_template=args.chat_template, system_prompt=args.system_prompt,
                assistant_prefix=args.assistant_prefix)


def _load_model(spec: str):
    import torch

    from pyvf.train.model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(spec)
    if torch.cuda.is_available():
        model.to("cuda")
    return model, tokenizer


def _rationalize(args) -> int:
    from pyvf.data import dataset
    from pyvf.train.rationalize import Progress, counts_path, rationalize, write_jsonl

    _positive(args, "samples", "limit", "max_new_tokens", "batch_size", "max_seq_len")
    if args.data == "openended":
        raise ConfigError("--data openended has no reference answers to write rationales toward")
    examples = dataset.load(args.data, n_synthetic=args.limit or 500, split="train")
    if args.limit is not None:
        examples = examples[:args.limit]
    model, tokenizer = _load_model(args.model)
    print(f"rationalize: {len(examples)} questions x {args.samples} rationales, model {args.model}, data {args.data}",
          flush=True)
    rows, counts = rationalize(model, tokenizer, examples, samples=args.samples, seed=args.seed,
                               max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               batch_size=args.batch_size, min_score=args.min_score, max_seq_len=args.max_seq_len,
                               select=args.select, progress=Progress(), **_prompting(args))
    write_jsonl(rows, args.output)
    summary = counts_path(args.output)
    tmp = summary.with_name(f".{summary.name}.tmp")
    tmp.write_text(json.dumps({**counts, "model": args.model, "data": args.data, "samples_per_question": args.samples,
                               "seed": args.seed}, indent=2))
    os.replace(tmp, summary)
    mean = sum(r["score"] for r in rows) / len(rows) if rows else 0.0
    print(f"rationalize: {counts['samples']} samples: {counts['scored']} scored, dropped {counts['leak_mentions']} "
          f"mentioning the reference, {counts['leak_early']} stating it early, {counts['no_marker']} without an "
          f"answer marker")
    print(f"rationalize: kept {len(rows)}/{counts['questions']} questions (mean score {mean:.3f}) -> {args.output} "
          f"(counts: {summary})")
    return 0


def _sft(args) -> int:
    from pyvf.data import dataset
    from pyvf.train.evaluate import evaluate
    from pyvf.train.sft import read_rows, save_model, sft, worked_solution_rows

    _positive(args, "steps", "batch_size", "max_seq_len")
    if args.eval_questions < 0:
        raise ConfigError(f"--eval-questions must be >= 0, got {args.eval_questions}")
    rows = read_rows(args.data)
    if args.train_on == "worked":
        rows = worked_solution_rows([r["question"] for r in rows])
    model, tokenizer = _load_model(args.model)
    prompting = _prompting(args)
    print(f"sft: {len(rows)} rows ({'worked solutions of the questions of ' if args.train_on == 'worked' else ''}"
          f"{args.data}), {args.steps} steps of {args.batch_size}, lr {args.lr:g}, seed {args.seed}", flush=True)
    losses = sft(model, tokenizer, rows, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                 max_seq_len=args.max_seq_len, log=lambda line: print(line, flush=True), **prompting)
    out = save_model(model, tokenizer, args.output_dir)
    record = {"data": args.data, "train_on": args.train_on, "rows": len(rows), "steps": args.steps, "lr": args.lr,
              "batch_size": args.batch_size, "seed": args.seed, "model": args.model, "first_loss": losses[0],
              "last_loss": losses[-1]}
    if args.eval_questions:
        examples = dataset.load(args.eval_data, n_synthetic=args.eval_questions, split="eval")[:args.eval_questions]
        result = evaluate(model, tokenizer, examples, max_new_tokens=64, **prompting)
        record["eval"] = {"data": args.eval_data, "accuracy": result["accuracy"], "n": result["n"]}
        (out / "eval.json").write_text(json.dumps(result, indent=2))
        print(f"sft: held-out accuracy {100 * result['accuracy']:.1f}% ({result['correct']}/{result['n']}) "
              f"data {args.eval_data}")
    (out / "sft.json").write_text(json.dumps(record, indent=2))
    print(f"sft: loss {losses[0]:.4f} -> {losses[-1]:.4f}; model -> {out}")
    return 0


def _bon(args) -> int:
    from pyvf.data import dataset
    from pyvf.train import bon
    from pyvf.verify import get_verifier

    _positive(args, "limit", "max_new_tokens", "batch_size", "max_seq_len")
    ns = bon.parse_ns(args.n)
    examples = dataset.load(args.data, n_synthetic=args.limit, split="eval")[:args.limit]
    model, tokenizer = _load_model(args.model)
    context = dict(model=model, tokenizer=tokenizer, max_seq_len=args.max_seq_len)
    rubric = args.rubric or ("story" if args.data == "openended" else None)
    if rubric is not None:
        context["rubric"] = rubric
    verifier = get_verifier(args.verifier, **context)
    stop = args.stop if args.stop is not None else bon.task_defaults(args.data)[1]
    print(f"bon: {len(examples)} questions x {max(ns)} samples, verifier {args.verifier}, model {args.model}",
          flush=True)
    prompts, completions = bon.sample_completions(
        model, tokenizer, examples, max(ns), seed=args.seed, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, stop=tuple(s for s in stop.split("|") if s), batch_size=args.batch_size,
        progress=lambda done, total: print(f"bon: sampled {done}/{total} questions", file=sys.stderr, flush=True),
        **_prompting(args, args.data))
    has_refs = all(ex.answers for ex in examples)
    curve = bon.best_of_n_curve(prompts, completions, [list(ex.answers) for ex in examples], ns, verifier)
    result = {"model": args.model, "data": args.data, "verifier": args.verifier, "questions": len(examples),
              "seed": args.seed, "temperature": args.temperature, "has_references": has_refs, "curve": curve,
              "verifier_stats": dict(getattr(verifier, "stats", {}) or {})}
    json_path, png = bon.write_result(result, args.output_dir)
    print(bon.format_table(result))
    print(f"bon: wrote {json_path}" + (f" and {png}" if png else ""))
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


# The subcommands other than train (which also takes config overrides as extra flags).
COMMANDS = {"eval": _eval, "demo": _demo, "selfplay": _selfplay, "rationalize": _rationalize, "sft": _sft,
            "bon": _bon, "bench": _bench}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "train":
            return _train(args, extra)
        return COMMANDS[args.command](args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        if os.environ.get("PYVF_DEBUG"):
            raise
        print(f"pyvf {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
