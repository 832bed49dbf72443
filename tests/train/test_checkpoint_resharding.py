"""DCP checkpoints reshard: a run saved by 2 processes resumes on 1 and then on 2 again
with the losses of an uninterrupted 2-process run, and a checkpoint is still a model."""

import json
import os
import subprocess
import sys

import pytest
import torch

from pyvf.cli import main as cli
from pyvf.runtime import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMON = ["--model", "builtin", "--seed", "1", "--device", "cpu", "--n-synthetic", "64", "--prompts-per-step", "2",
          "--group-size", "4", "--max-new-tokens", "40", "--lr", "1e-4", "--progress", "false", "--plot", "false"]

ASYNC = ["--async-checkpoint", "true", "--save-every", "1", "--keep-checkpoints", "2"]


def _losses(run) -> dict[int, float]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, filter(str.strip, f))}


def _train(*args, nproc: int) -> None:
    """`pyvf train` in `nproc` processes of this checkout (torchrun for more than one)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", "pyvf.cli", "train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_then_one_then_two_processes_match_an_uninterrupted_run(tmp_path):
    reference, run = tmp_path / "reference", tmp_path / "run"
    _train(*COMMON, "--max-steps", "6", "--output-dir", str(reference), nproc=2)
    # Async saves every step, each written while the next step trains, then sync ones.
    _train(*COMMON, "--max-steps", "6", "--stop-after", "2", "--output-dir", str(run), *ASYNC, nproc=2)
    ckpt = checkpoint.resolve(run)
    assert ckpt.name == "step-000002" and checkpoint.is_sharded(ckpt)
    assert not (ckpt / "model.safetensors").exists() and not list(ckpt.glob("optimizer*"))
    assert len(list((ckpt / checkpoint.DCP).glob("*.distcp"))) == 2  # one file of shards per rank
    _train("--resume", str(run), "--stop-after", "4", *ASYNC, nproc=1)
    assert checkpoint.resolve(run).name == "step-000004"
    _train("--resume", str(run), "--async-checkpoint", "false", nproc=2)
    want, got = _losses(reference), _losses(run)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-9), step


def test_a_checkpoint_is_a_model(tmp_path):
    from pyvf.runtime.model import load_model_and_tokenizer

    run = tmp_path / "run"
    assert cli(["train", *COMMON, "--max-steps", "1", "--output-dir", str(run)]) == 0
    ckpt = checkpoint.resolve(run)
    assert checkpoint.is_sharded(ckpt)
    model, _ = load_model_and_tokenizer(str(ckpt))
    saved = checkpoint.load_model_tensors(ckpt)
    assert saved and all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert cli(["eval", "--model", str(ckpt), "--limit", "2", "--max-new-tokens", "8",
                "--output", str(tmp_path / "e.json")]) == 0
