"""End-to-end trainer tests on the CPU: a model directory saved by the test, exact
resume, two-process FSDP2 over gloo, and the CLI's error handling."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from pyvf.cli import main as cli
from pyvf.runtime import checkpoint

BUILTIN = "builtin"
FAST = ["--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "40", "--progress", "false",
        "--plot", "false", "--lr", "1e-4"]


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A Hugging Face model directory made here: a random tiny Qwen3 and the shipped tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from pyvf.assets import load_tokenizer

    tok = load_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                      tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-model")
    Qwen3ForCausalLM(cfg).save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return str(path)


def test_train_with_a_model_directory(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert cli(["train", "--model", tiny_model_dir, "--max-steps", "2", "--output-dir", str(out), *FAST]) == 0
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    ckpt = out / "checkpoints" / "step-000002"
    assert checkpoint.is_sharded(ckpt) and (ckpt / "config.json").is_file()
    assert (out / "checkpoints" / "latest").read_text() == "step-000002"
    assert not list((out / "checkpoints").glob(".tmp*"))
    # A checkpoint is itself a model directory.
    assert cli(["eval", "--model", str(ckpt), "--limit", "4", "--max-new-tokens", "8",
                "--output", str(tmp_path / "e.json")]) == 0


# Every registered objective, with what it needs to run fast on the built-in tasks.
OBJECTIVE_ARGS = {
    "verifree": [], "jepo": [], "rlpr": [], "nover": [], "verifier": [],
    # 2 prompts x 4 samples of the shipped model can be all right or all wrong per group.
    "pcl": ["--prompts-per-step", "4"],
    "rzero": ["--solver-samples", "4"],
    "selfrubric": ["--data", "openended", "--max-new-tokens", "64"],
}
OBJECTIVES = list(OBJECTIVE_ARGS)


def test_every_registered_objective_is_tested():
    from pyvf.objectives import objective_names

    assert sorted(objective_names()) == sorted(OBJECTIVES)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_resume_alone_continues_bit_exactly(tmp_path, objective):
    """Stop after step 2, then `pyvf train --resume RUN` with no other flag: the saved
    config, the run's directory and its step budget carry over, and steps 3-4 match an
    uninterrupted run bit for bit (RLPR's filter and score A, NOVER's proxy included)."""
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["--objective", objective, "--max-steps", "4", "--seed", "3", "--n-synthetic", "64",
              "--proxy-sync-every", "2", *FAST, *OBJECTIVE_ARGS[objective]]
    assert cli(["train", *common, "--output-dir", str(full)]) == 0
    assert cli(["train", *common, "--output-dir", str(part), "--stop-after", "2"]) == 0
    assert [r["step"] for r in metrics(part)] == [1, 2]
    assert cli(["train", "--resume", str(part)]) == 0
    a, b = metrics(full), metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert (part / "checkpoints" / "latest").read_text() == "step-000004"
    # The rewards differ within groups, so the losses below carry the whole estimator.
    assert any(r["advantage_std"] > 0 for r in a) and any(r["loss"] != 0 for r in a)
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"], f"step {ra['step']}: {ra['loss']!r} != {rb['loss']!r}"
        assert ra["grad_norm"] == rb["grad_norm"]
    assert all(r["rollout_logprob_diff"] < 1e-4 for r in a)


def test_resume_overrides(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(["train", "--max-steps", "2", "--stop-after", "1", "--n-synthetic", "64", "--output-dir", str(run),
                *FAST]) == 0
    # Identity keys may not change silently.
    assert cli(["train", "--resume", str(run), "--objective", "rlpr"]) == 2
    assert "objective was 'verifree'" in capsys.readouterr().err
    # A budget override extends the run and is printed; output stays in the run.
    assert cli(["train", "--resume", str(run / "checkpoints" / "step-000001"), "--max-steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "resume: max_steps 2 -> 3" in out
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]
    assert (run / "checkpoints" / "latest").read_text() == "step-000003"
    # --force-override allows it; --output-dir moves the output.
    other = tmp_path / "other"
    assert cli(["train", "--resume", str(run), "--seed", "9", "--max-steps", "4", "--force-override",
                "--output-dir", str(other)]) == 0
    assert "resume: seed 0 -> 9" in capsys.readouterr().out
    assert [r["step"] for r in metrics(other)] == [4]


# Not jepo and verifier, to keep CI within its time: JEPO rewards in VeriFree's gradient
# forward (two processes: verifree here and test_long_reasoning's separate pass), and the
# verifier's plain policy gradient is part of every objective below.
@pytest.mark.parametrize("objective", [o for o in OBJECTIVES if o not in ("jepo", "verifier")])
def test_two_processes_match_one(tmp_path, objective):
    single, double = tmp_path / "single", tmp_path / "double"
    common = ["--objective", objective, "--model", BUILTIN, "--max-steps", "2", "--seed", "1", "--device", "cpu",
              "--n-synthetic", "64", *FAST, *OBJECTIVE_ARGS[objective]]
    if objective == "verifree":  # held-out evaluation: each rank decodes its share with the unsharded weights
        common += ["--eval-data", "synthetic", "--eval-limit", "7"]
    assert cli(["train", *common, "--output-dir", str(single)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pyvf.cli", "train", *common, "--output-dir", str(double)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = metrics(single), metrics(double)
    assert len(a) == len(b) == 2
    assert any(r["advantage_std"] > 0 for r in a)
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-9)
        assert rb["reward_mean"] == pytest.approx(ra["reward_mean"], rel=1e-4, abs=1e-9)
    if objective == "verifree":
        one, two = (json.loads((d / "eval" / "step-000002.json").read_text()) for d in (single, double))
        assert two["n"] == 7
        assert [d["completions"] for d in two["details"]] == [d["completions"] for d in one["details"]]
        assert b[-1]["eval_accuracy"] == a[-1]["eval_accuracy"]


@pytest.mark.parametrize("args,message", [
    (["train", "--bogus-key", "1"], "unknown config key 'bogus_key'"),
    (["train", "--model", "/nonexistent/model", "--max-steps", "1"], "is not a Hugging Face model directory"),
    (["train", "--group-size", "1"], "group_size must be >= 2"),
    (["train", "--rollout", "vllm", "--max-steps", "1"], "vLLM is not installed"),
    (["train", "--objective", "nonsense"], "objective must be one of"),
    (["train", "--max-seq-len", "8", "--max-steps", "1"], "max_seq_len 8 is too short to hold any answer"),
    (["train", "--data", "EMPTY", "--max-steps", "1"], "is empty"),
    (["eval", "--model", "/nonexistent"], "is not a Hugging Face model directory"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"question": " ", "answer": "1"}) + "\n")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    proc = subprocess.run([sys.executable, "-m", "pyvf.cli", *args, "--output-dir" if args[0] == "train" else "--output",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_train_a_chat_model(tmp_path, caplog):
    """A model directory whose tokenizer has a chat template, chat special tokens, two
    EOS ids and no pad token: prompts go through the template, generation stops at
    either EOS, and the log says so."""
    import logging

    from chat_fixtures import chat_model_dir

    model_dir = chat_model_dir(tmp_path / "model", pad=False)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="pyvf"):
        assert cli(["train", "--model", str(model_dir), "--assistant-prefix", "<think>", "--system-prompt",
                    "Be brief.", "--max-steps", "1", "--n-synthetic", "16", "--output-dir", str(out), *FAST]) == 0
    text = caplog.text
    assert "chat template" in text and "<think>" in text
    assert "<|im_end|>" in text and "<|endoftext|>" in text  # both stop tokens
    assert [r["step"] for r in metrics(out)] == [1]


def _nan_at(trainer, steps):
    """Makes the decoder's output NaN during the training forward of `steps`, as an
    overflow would (the rollout and the scoring before it stay finite)."""
    def poison(module, args, output):
        if trainer.state.step + 1 in steps and torch.is_grad_enabled():
            return output * float("nan")
        return output

    trainer.policy.model.get_decoder().norm.register_forward_hook(poison)


def test_a_nonfinite_step_is_skipped_and_counted(tmp_path):
    from pyvf.train.config import from_dict
    from pyvf.train.trainer import Trainer

    cfg = from_dict({"max_steps": 3, "n_synthetic": 32, "output_dir": str(tmp_path), "prompts_per_step": 2,
                     "group_size": 4, "max_new_tokens": 40, "progress": False, "plot": False, "lr": 1e-3})
    trainer = Trainer.build(cfg)
    _nan_at(trainer, {2})
    before = {k: v.clone() for k, v in trainer.policy.model.state_dict().items()}
    trainer.step()
    after_one = {k: v.clone() for k, v in trainer.policy.model.state_dict().items()}
    assert any(not torch.equal(before[k], after_one[k]) for k in before)  # step 1 updated
    record = trainer.step()
    assert record["skipped_nonfinite"] == 1 and not math.isfinite(record["loss"])
    assert all(torch.equal(after_one[k], v) for k, v in trainer.policy.model.state_dict().items())  # no update
    assert trainer.step()["skipped_nonfinite"] == 0 and trainer.nonfinite_in_row == 0
    assert [r["skipped_nonfinite"] for r in metrics(tmp_path)] == [0, 1, 0]


def test_nonfinite_steps_in_a_row_stop_the_run_with_finite_weights_saved(tmp_path, capsys):
    from pyvf.train import trainer as trainer_mod

    build = trainer_mod.Trainer.build

    def build_poisoned(*args, **kw):
        trainer = build(*args, **kw)
        _nan_at(trainer, {2, 3, 4})
        return trainer

    trainer_mod.Trainer.build = build_poisoned
    try:
        code = cli(["train", "--max-steps", "6", "--save-every", "1", "--n-synthetic", "32", "--output-dir",
                    str(tmp_path), *FAST])
    finally:
        trainer_mod.Trainer.build = build
    assert code == 1
    assert "step 4: the loss or gradient norm was not finite for 3 steps in a row" in capsys.readouterr().err
    assert [r["skipped_nonfinite"] for r in metrics(tmp_path)] == [0, 1, 1, 1]
    latest = checkpoint.resolve(tmp_path)
    assert latest.name == "step-000003"
    assert all(torch.isfinite(t).all() for t in checkpoint.load_model_tensors(latest).values())



def test_sigterm_finishes_the_step_saves_and_exits_zero(tmp_path):
    """A scheduler's SIGTERM with the default settings: the step in flight finishes, a
    checkpoint of it is written and the process exits 0; --resume then goes on."""
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pyvf.cli", "train", "--max-steps", "200", "--n-synthetic", "64",
                             "--output-dir", str(out), *FAST], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and metrics(out)):
        time.sleep(0.2)
    assert metrics(out), "no step finished in time"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM" in err
    steps = [r["step"] for r in metrics(out)]
    assert (out / "checkpoints" / "latest").read_text() == f"step-{steps[-1]:06d}" and steps[-1] < 200
    assert cli(["train", "--resume", str(out), "--max-steps", str(steps[-1] + 1)]) == 0
    assert [r["step"] for r in metrics(out)] == list(range(1, steps[-1] + 2))


@pytest.mark.parametrize("args", [["--objective", "verifree", "--reward-form", "logprob"], ["--objective", "jepo"]])
def test_likelihood_rewards_train_on_the_long_answer_task(tmp_path, args):
    """The long-answer task with the log-probability reward and with JEPO: every
    completion scored (the marker appended where it is missing), rewards that are
    log-probabilities (logprob) or probabilities (JEPO's reward_mean), finite losses."""
    out = tmp_path / "run"
    assert cli(["train", *args, "--data", "synthetic-long", "--max-steps", "2", "--n-synthetic", "64",
                "--output-dir", str(out), *FAST]) == 0
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["rewarded_frac"] == 1.0 and math.isfinite(r["loss"]) and r["advantage_std"] > 0 for r in records)
    assert all(r["answer_len"] > 15 for r in records)  # the worked solution, not a number
    if "logprob" in args:
        assert all(r["reward_mean"] < 0 for r in records)
    else:
        assert all(0 <= r["reward_mean"] < 1 and r["jepo_bound"] < 0 for r in records)
