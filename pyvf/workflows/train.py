"""`pyvf train`: the config from a file, the command line and, with --resume, the run's
saved config; then the trainer. Every key is --key value (`pyvf train --help` lists them
with their explanations and defaults: the common keys, then each objective's)."""

from __future__ import annotations

import argparse
import os

from pyvf.objectives import get_objective, objective_names
from pyvf.objectives.base import ObjectiveConfig
from pyvf.options import ConfigError, add_option, add_options, keys
from pyvf.runtime import checkpoint
from pyvf.train.config import TrainConfig, from_dict, load_file, parse_overrides, saved_values
from pyvf.train.trainer import train

HELP = "train a model with a verifier-free objective"
DESCRIPTION = ("Trains with the chosen objective. Keys come from --config (YAML, TOML or JSON), then the command "
               "line; with --resume, from the run's saved config first.")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML, TOML or JSON file of config keys")
    parser.add_argument("--resume", default=None, metavar="RUN_OR_CHECKPOINT",
                        help="continue a run: its saved config, its output directory, its step budget; keys given "
                             "on the command line override the saved ones (each override is printed)")
    parser.add_argument("--force-override", action="store_true",
                        help="with --resume: allow overriding what makes it another run (" +
                             ", ".join(TrainConfig.IDENTITY) + ")")
    add_options(parser.add_argument_group("common keys"), TrainConfig, given_only=True)
    # Each objective's keys in a group of its own; keys several objectives have (loss_agg:
    # all of them) in one group, with every objective's default.
    owners: dict[str, list[str]] = {}
    for name in objective_names():
        for key in keys(get_objective(name).Config):
            owners.setdefault(key, []).append(name)
    shared = parser.add_argument_group("keys of several objectives (default: each objective's own)")
    for key, names in owners.items():
        if len(names) > 1:
            config = get_objective(names[0]).Config
            help_from = ObjectiveConfig if key in keys(ObjectiveConfig) else config
            defaults = "; ".join(f"{o} {getattr(get_objective(o).Config(), key)}" for o in names)
            add_option(shared, help_from, key, given_only=True, default_text=defaults)
    for name in objective_names():
        config = get_objective(name).Config
        group = parser.add_argument_group(f"objective {name} (--objective {name})")
        for key in keys(config):
            if len(owners[key]) == 1:
                add_option(group, config, key, given_only=True)


def resume_config(resume: str, values: dict, *, force: bool = False, announce=print) -> TrainConfig:
    """The config of a resumed run: the one saved with the checkpoint, with `values`
    (from --config and the command line) on top. stop_after never carries over, the
    output stays in the run's directory unless output_dir is given, and changing what
    makes it another run (TrainConfig.IDENTITY) is an error unless `force`."""
    saved = checkpoint.saved_config(resume)
    kept, dropped = saved_values(saved, saved.get("objective", TrainConfig.objective))
    if dropped:
        announce(f"resume: ignoring saved keys this version or objective does not know: {', '.join(dropped)}")
    base = from_dict(kept)
    for key in TrainConfig.PER_INVOCATION:
        setattr(base, key, getattr(TrainConfig(), key))
    base.output_dir = str(checkpoint.run_dir(resume))
    cfg = from_dict(values, base=base)
    old_values, new_values = base.to_dict(), cfg.to_dict()
    for key in sorted(values):
        name = key.replace("-", "_")
        old, new = old_values.get(name), new_values.get(name)
        if old == new:
            continue
        if name in TrainConfig.IDENTITY and not force:
            raise ConfigError(f"--resume: {name} was {old!r} in this run; overriding it to {new!r} makes another "
                              f"run (add --force-override to do it anyway)")
        announce(f"resume: {name} {old!r} -> {new!r}")
    return cfg


def main(args: argparse.Namespace, extra: list[str] = ()) -> int:
    values = load_file(args.config) if args.config else {}
    given = {name: value for name, value in vars(args).items() if name not in ("command", "config", "resume",
                                                                                "force_override")}
    values.update(given)
    values.update(parse_overrides(list(extra)))  # keys of an objective given as module:Class
    if args.force_override and not args.resume:
        raise ConfigError("--force-override only applies with --resume")
    if args.resume:
        cfg = resume_config(args.resume, values, force=args.force_override).validate()
    else:
        cfg = from_dict(values).validate()
    record = train(cfg, resume=args.resume)
    if record and os.environ.get("RANK", "0") == "0":
        print(f"train: step {record['step']} loss {record['loss']:.4f} reward {record['reward_mean']:.3f} "
              f"-> {cfg.output_dir}")
    return 0
