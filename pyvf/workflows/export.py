"""`pyvf export RUN OUT`: a run's latest checkpoint (or a checkpoint) as a plain Hugging
Face model directory for serving, in float32 (the checkpoint's master weights, as saved)
or bfloat16."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from pyvf.options import add_options, from_args, option
from pyvf.runtime.model import load_model_and_tokenizer, save_model

HELP = "write a run's weights as a Hugging Face model directory (float32 or bfloat16)"


@dataclass
class ExportOptions:
    dtype: str = option("float32", "the weights' dtype in OUT", choices=("float32", "bfloat16"))


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a run directory (its latest checkpoint) or a checkpoint")
    parser.add_argument("out", metavar="OUT", help="the model directory to write")
    add_options(parser, ExportOptions)


def main(args: argparse.Namespace) -> int:
    opts = from_args(ExportOptions, args)
    model, tokenizer = load_model_and_tokenizer(args.run, getattr(torch, opts.dtype))
    out = save_model(model, tokenizer, args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"export: {args.run} -> {out} ({n:,} parameters, {opts.dtype})")
    return 0
