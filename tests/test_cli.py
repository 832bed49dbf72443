"""The `pyvf` command line: every subcommand in the table, every key in --help."""

import os
import subprocess
import sys


def test_train_help_lists_every_key():
    """The common keys and every objective's, each with its default."""
    from pyvf.objectives import get_objective, objective_names
    from pyvf.options import keys
    from pyvf.train.config import TrainConfig

    proc = subprocess.run([sys.executable, "-m", "pyvf.cli", "train", "--help"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "1000"})
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    every = [keys(TrainConfig)] + [keys(get_objective(name).Config) for name in objective_names()]
    for fields in every:
        for name in fields:
            at = next(i for i, line in enumerate(lines) if line.strip().startswith(f"--{name.replace('_', '-')} "))
            entry = " ".join(lines[at:at + 2])  # argparse puts a long option's help on the next line
            assert "(default: " in entry, entry
    assert "objective rlpr (--objective rlpr):" in proc.stdout and "keys of several objectives" in proc.stdout


def test_every_subcommand_has_a_handler():
    import argparse

    from pyvf.cli import COMMANDS, build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == set(COMMANDS) | {"train"}
