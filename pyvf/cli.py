"""The `pyvf` command line: a table of subcommands, each a module with `add_args(parser)`,
`main(args)`, `HELP` and optionally `DESCRIPTION`.

Errors in what the user gave (config keys, paths, data) print one line and exit 2;
set PYVF_DEBUG=1 to see the traceback instead."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pyvf import bench
from pyvf.options import ConfigError
from pyvf.train.trainer import NonFiniteError
from pyvf.workflows import bon, demo, evaluate, export, rationalize, selfplay, sft, train

COMMANDS = {"train": train, "eval": evaluate, "demo": demo, "selfplay": selfplay, "rationalize": rationalize,
            "sft": sft, "bon": bon, "export": export, "bench": bench}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyvf", description="Verifier-free RL for language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        command = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", None),
                                 allow_abbrev=False)
        module.add_args(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "train":  # an objective given as module:Class brings keys of its own
            return train.main(args, extra)
        return COMMANDS[args.command].main(args)
    except (ConfigError, ValueError, FileNotFoundError, NonFiniteError) as e:
        if os.environ.get("PYVF_DEBUG"):
            raise
        print(f"pyvf {args.command}: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, NonFiniteError) else 2


if __name__ == "__main__":
    sys.exit(main())
