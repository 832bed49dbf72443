"""Long reasoning: a group larger than the micro-batch budget trains every objective
(VeriFree through the separate reward pass) with the losses of one micro-batch, and the
length limit follows what a step produces unless it is set, saying when it cuts."""

import logging
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from test_trainer import FAST, OBJECTIVE_ARGS, OBJECTIVES, metrics

from pyvf.assets import load_tokenizer
from pyvf.bench.train_step import ReplayEngine, _qwen3
from pyvf.cli import main as cli
from pyvf.options import ConfigError
from pyvf.packing import Sequence
from pyvf.train.config import from_dict
from pyvf.train.trainer import Trainer, plan_step


def _seqs(lengths, groups):
    return [Sequence([1] * (n - 1), [2], [], group=g) for n, g in zip(lengths, groups)]


def test_plan_step():
    lengths, groups = [30, 30, 30, 10, 10, 40], [0, 0, 0, 1, 1, 2]
    seqs = _seqs(lengths, groups)
    for reward_pass in (None, "fused", "separate", "auto"):
        plan, separated = plan_step(seqs, 100, reward_pass)
        assert sorted(i for mb in plan for i in mb) == list(range(6))
        assert all(sum(lengths[i] for i in mb) <= 100 for mb in plan)
    # Rewards known before the forward: any composition; group 0 (90) may share with group 2.
    plan, separated = plan_step(seqs, 60, None)
    assert separated == [] and all(sum(lengths[i] for i in mb) <= 60 for mb in plan)
    with pytest.raises(ConfigError, match="group 0 has 90 tokens, more than micro_batch_tokens"):
        plan_step(seqs, 60, "fused")
    # auto: groups 1 and 2 fit whole, group 0 is separated and never shares a micro-batch with them.
    plan, separated = plan_step(seqs, 60, "auto")
    assert separated == [0, 1, 2]
    for mb in plan:
        assert set(mb) <= {0, 1, 2} or not set(mb) & {0, 1, 2}
    assert any(set(mb) == {3, 4} or {3, 4} <= set(mb) for mb in plan)  # group 1 whole
    plan, separated = plan_step(seqs, 60, "separate")
    assert separated == list(range(6))
    with pytest.raises(ConfigError, match="a training sequence has 40 tokens, more than micro_batch_tokens \\(39\\)"):
        plan_step(seqs, 39, None)
    assert plan_step([], 10, "auto") == ([], [])


def _first(run, *args):
    assert cli(["train", "--max-steps", "1", "--seed", "3", "--n-synthetic", "64", "--output-dir", str(run), *FAST,
                *args]) == 0
    return metrics(run)[0]


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_micro_batches_smaller_than_a_group_train_every_objective(tmp_path, objective):
    """A budget of 200 tokens (100 for R-Zero) holds one or two sequences, less than any group: the step
    trains with the loss and gradient norm of the one-micro-batch run (VeriFree scores
    its rewards in the separate pass first)."""
    args = ["--objective", objective, *OBJECTIVE_ARGS[objective]]
    whole = _first(tmp_path / "whole", *args, "--micro-batch-tokens", "8192")
    # R-Zero's first step trains the challenger, on short prompts.
    split = _first(tmp_path / "split", *args, "--micro-batch-tokens", "100" if objective == "rzero" else "200")
    assert whole["micro_batches"] == 1 and split["micro_batches"] > 2
    assert whole["advantage_std"] > 0 and whole["loss"] != 0
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert split["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5)
    assert split["reward_mean"] == pytest.approx(whole["reward_mean"], rel=1e-5)
    if objective in ("verifree", "jepo"):  # rewards from the gradient forward
        assert (whole["separated_frac"], split["separated_frac"]) == (0.0, 1.0)  # auto: fused, then separate
        assert split["time_reward_pass"] > 0
        forced = _first(tmp_path / "separate", *args, "--micro-batch-tokens", "8192", "--reward-pass", "separate")
        assert forced["separated_frac"] == 1.0 and forced["micro_batches"] == 1
        assert forced["loss"] == pytest.approx(whole["loss"], rel=1e-5)
        assert forced["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5)
    else:
        assert split["separated_frac"] == 0.0 and split["time_reward_pass"] == 0.0


def _long_step(max_seq_len: int | None, caplog) -> dict:
    """One VeriFree step whose completions are 600 tokens long and end in an answer, on
    a tiny random model that takes long positions."""
    tok = load_tokenizer()
    values = dict(objective="verifree", n_synthetic=16, group_size=4, prompts_per_step=2, max_new_tokens=600,
                  micro_batch_tokens=8192, progress=False, plot=False, output_dir=tempfile.mkdtemp(prefix="pyvf-"))
    if max_seq_len is not None:
        values["max_seq_len"] = max_seq_len
    cfg = from_dict(values)
    model = _qwen3("tiny", len(tok), torch.float32, torch.device("cpu"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pyvf"):
        return Trainer.build(cfg, engine=ReplayEngine(tok, 600), model=model, tokenizer=tok).step()


def test_max_new_tokens_above_the_old_length_limit_zeroes_no_reward(caplog):
    """max_seq_len defaulted to 512 whatever max_new_tokens was; unset, it now holds what
    the step produces. Set, it cuts, says so every step, and counts it."""
    record = _long_step(None, caplog)
    assert record["over_length_frac"] == 0.0 and record["rewarded_frac"] == 1.0
    assert "did not fit max_seq_len" not in caplog.text
    record = _long_step(512, caplog)  # the old default
    assert record["over_length_frac"] == 1.0 and record["rewarded_frac"] == 0.0
    assert "step 1: 8 of 8 samples did not fit max_seq_len 512" in caplog.text


def test_max_new_tokens_must_fit_the_micro_batch(tmp_path, capsys):
    assert cli(["train", "--max-new-tokens", "300", "--micro-batch-tokens", "200", "--output-dir",
                str(tmp_path / "r")]) == 2
    assert "micro_batch_tokens (200) must be larger than max_new_tokens (300)" in capsys.readouterr().err


def test_two_processes_with_the_separate_reward_pass_match_one(tmp_path):
    """Under torchrun each rank runs the reward pass and the gradient micro-batches of
    its own groups, as many forwards as the busiest rank (FSDP2's collectives pair up),
    and the step's losses are those of one process."""
    common = ["--objective", "verifree", "--max-steps", "2", "--seed", "1", "--device", "cpu", "--n-synthetic", "64",
              "--micro-batch-tokens", "200", *FAST]
    single = tmp_path / "single"
    assert cli(["train", *common, "--output-dir", str(single)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pyvf.cli", "train", *common, "--output-dir", str(tmp_path / "double")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = metrics(single), metrics(tmp_path / "double")
    assert [r["separated_frac"] for r in a] == [r["separated_frac"] for r in b] == [1.0, 1.0]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-9)
        assert rb["reward_mean"] == pytest.approx(ra["reward_mean"], rel=1e-4, abs=1e-9)
