"""A run killed with SIGKILL at random moments (during steps and during checkpoint
writes) and resumed each time ends with the weights and metrics of an uninterrupted run."""

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

from pyvf.runtime import checkpoint

ARGS = ["--max-steps", "5", "--save-every", "1", "--seed", "4", "--n-synthetic", "32", "--prompts-per-step", "2",
        "--group-size", "4", "--max-new-tokens", "40", "--progress", "false", "--plot", "false", "--lr", "1e-4"]


def _train(out: Path, resume: bool) -> subprocess.Popen:
    args = ["--resume", str(out)] if resume else [*ARGS, "--output-dir", str(out)]
    return subprocess.Popen([sys.executable, "-m", "pyvf.cli", "train", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _has_checkpoint(out: Path) -> bool:
    try:
        checkpoint.resolve(out)
    except ValueError:
        return False
    return True


def _final(out: Path) -> tuple[dict, list[dict]]:
    weights = checkpoint.load_model_tensors(checkpoint.resolve(out))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return weights, records


def _steps_done(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    proc = _train(reference, resume=False)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-2000:]

    out = tmp_path / "killed"
    rng = random.Random(7)
    kills = 0
    while kills < 4:
        done = _steps_done(out)
        proc = _train(out, resume=_has_checkpoint(out))
        # Kill once the run logged a step past where it started (the step is done and its
        # checkpoint being written), a random moment later: during the save or the next step.
        deadline = time.time() + 300
        while proc.poll() is None and _steps_done(out) <= done and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is not None:
            break  # it finished before the kill
        proc.kill()
        proc.wait()
        kills += 1
    if proc.poll() is None or not (_has_checkpoint(out) and checkpoint.resolve(out).name == "step-000005"):
        proc = _train(out, resume=_has_checkpoint(out))
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-2000:]
    assert kills >= 2, "the kills all came too late: the test did not interrupt the run"
    (want, want_records), (got, got_records) = _final(reference), _final(out)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert [r["step"] for r in got_records] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in got_records] == [r["loss"] for r in want_records]
