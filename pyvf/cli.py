"""The `pyvf` command line."""

from __future__ import annotations

import argparse
import sys


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(float(s)) for s in text.split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--sizes must be positive integers, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyvf", description="Verifier-free RL for language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="time the ops at sizes that fit this machine and print a table")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--sizes", type=_sizes, default=None,
                       help="comma-separated batch sizes, e.g. 1e4,1e6 (default: by device)")
    bench.add_argument("--output", default=None, help="also write the results as JSON to this file")
    bench.add_argument("--impls", default=None,
                       help="comma-separated log-prob implementations (default: all of "
                            "pyvf,torch-eager,torch-compile-chunked,liger-flce,cut-cross-entropy)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        from pyvf import bench

        impls = args.impls.split(",") if args.impls else None
        unknown = sorted(set(impls or []) - set(bench.LOGPROB_IMPLS))
        if unknown:
            print(f"pyvf bench: unknown --impls {', '.join(unknown)}; choose from {', '.join(bench.LOGPROB_IMPLS)}",
                  file=sys.stderr)
            return 2
        return bench.main(args.device, args.sizes, args.output, impls)
    return 2


if __name__ == "__main__":
    sys.exit(main())
