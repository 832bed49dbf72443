"""Rollouts beside training (rollout_mode, rollout_procs): engine processes that receive the
trainer's weights over a gloo group, one-step-off and bounded-staleness asynchronous
pipelines, and truncated importance sampling (tis_cap)."""

import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "objectives"))

from helpers import config, context, grads, make_samples, tiny_policy  # noqa: E402

from pyvf.cli import main as cli  # noqa: E402
from pyvf.objectives import get_objective  # noqa: E402
from pyvf.packing import ROLE_REASONING, pack  # noqa: E402
from pyvf.runtime.rollout.remote import WeightLayout  # noqa: E402
from pyvf.train.trainer import accumulate_gradients  # noqa: E402

FAST = ["--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "24", "--progress", "false",
        "--plot", "false", "--lr", "1e-4"]
SAME = ("loss", "grad_norm", "reward_mean", "entropy", "reasoning_len")


def run(out, *args) -> list[dict]:
    assert cli(["train", "--output-dir", str(out), *FAST, *args]) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_async_with_max_staleness_zero_is_sync_and_engines_get_the_trainers_weights(tmp_path):
    """Engine process, sync: every step samples with the weights just published (lr 1e-4
    moves them each step), so engine and trainer log-probs agree to float rounding.
    Async with max_staleness 0 waits for those weights: the same run, bit for bit. The
    held-out evaluation decodes with the trainer's own weights (the engines' may lag)."""
    held_out = ["--eval-data", "synthetic", "--eval-limit", "6"]
    sync = run(tmp_path / "sync", "--max-steps", "3", "--rollout-procs", "1", *held_out)
    lagless = run(tmp_path / "async", "--max-steps", "3", "--rollout-mode", "async", "--max-staleness", "0",
                  *held_out)
    for a, b in zip(sync, lagless):
        assert {k: a[k] for k in SAME} == {k: b[k] for k in SAME}
    assert "eval_accuracy" in sync[-1] and sync[-1]["eval_accuracy"] == lagless[-1]["eval_accuracy"]
    assert (json.loads((tmp_path / "sync" / "eval" / "step-000003.json").read_text())["details"]
            == json.loads((tmp_path / "async" / "eval" / "step-000003.json").read_text())["details"])
    for r in sync + lagless:
        assert r["staleness"] == 0 and r["staleness_max"] == 0
        assert r["is_weight"] == 1.0 and r["is_capped_frac"] == 0.0  # the behaviour is the trained policy
        assert r["rollout_logprob_diff"] < 1e-4
    assert sync[-1]["grad_norm"] > 0


def test_one_step_off_is_reproducible_and_resumes_bit_exactly(tmp_path):
    """Another run, stopped after step 2 and resumed, is the same run bit for bit."""
    whole = run(tmp_path / "a", "--max-steps", "4", "--rollout-mode", "one_step_off")
    run(tmp_path / "c", "--max-steps", "4", "--rollout-mode", "one_step_off", "--stop-after", "2")
    resumed = run(tmp_path / "c", "--max-steps", "4", "--rollout-mode", "one_step_off", "--resume", str(tmp_path / "c"))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, c in zip(whole, resumed):
        assert {k: a[k] for k in SAME} == {k: c[k] for k in SAME}
    # Batch t was sampled with the weights after step t - 2: one version behind from step 2 on.
    assert [r["staleness"] for r in whole] == [0.0, 1.0, 1.0, 1.0]
    # From step 3 the sampling weights differ from the trained ones: the tokens get weights.
    assert all(r["is_weight"] != 1.0 and r["is_weight_max"] < 2 for r in whole[2:])
    assert (tmp_path / "c" / "checkpoints" / "step-000002" / "rollout.pt").is_file()


def test_async_trains_with_an_engine_process_and_resumes_without_losing_prompts(tmp_path):
    run(tmp_path / "a", "--max-steps", "4", "--rollout-mode", "async", "--max-staleness", "2", "--stop-after", "2")
    state = json.loads((tmp_path / "a" / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    kept = torch.load(tmp_path / "a" / "checkpoints" / "step-000002" / "rollout.pt", weights_only=True)
    # Steps 3 and 4 were in flight: their prompts are kept, and counted as taken.
    assert [p["step"] for p in kept["ranks"][0]["pending"]] == [3, 4]
    assert state["data_position"] == 4 * 2
    records = run(tmp_path / "a", "--max-steps", "4", "--rollout-mode", "async", "--max-staleness", "2",
                   "--resume", str(tmp_path / "a"))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["staleness_max"] <= 2 for r in records)
    final = json.loads((tmp_path / "a" / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert final["data_position"] == 4 * 2  # every prompt once: none lost, none sampled twice


def _weighted_step(behaviour_shift: float | None, tis_cap: float = 2.0, policy_version: int | None = 0):
    """Gradients of one verifier step on fixed samples whose behaviour log-probs are the
    trainer's own minus `behaviour_shift` (None: the samples count as on-policy)."""
    policy, tok = tiny_policy("fused")
    cfg = config(objective="verifier", tis_cap=tis_cap)
    obj = get_objective("verifier")(cfg, tok)
    samples = make_samples(tok)
    ts = obj.sequences(samples)
    batch = pack(ts.sequences)
    with torch.no_grad():
        current = policy(batch)
    rows = (batch.roles == ROLE_REASONING).nonzero().squeeze(1)
    k = 0
    for s in samples:
        n = len(s.ids)
        s.rollout_logprobs = (current[rows[k:k + n]].double() - (behaviour_shift or 0.0)).tolist()
        k += n
        if behaviour_shift is not None:
            s.policy_version = policy_version  # step 2 trains version 1: one behind
    rewards = torch.tensor([1.0, 0.2, 0.0, 0.7, 0.0, 0.9, 0.3, 0.3], dtype=torch.float64)
    totals = accumulate_gradients(cfg, obj, "token_mean", policy, samples, rewards, context(policy, step=2))
    return grads(policy), totals


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_truncated_importance_weights_scale_the_policy_gradient():
    """Every trained row of the verifier's loss is a sampled token, so a behaviour policy
    that gave every token 1/1.5 of the current probability scales the gradient by 1.5; a
    ratio of 3 is cut to tis_cap 2; tis_cap 0 turns the weights off; on-policy samples
    take no weight at all."""
    base, t0 = _weighted_step(None)
    assert t0["is_tokens"] == 0 and t0["staleness"] == 0
    half, t1 = _weighted_step(math.log(1.5))
    assert rel(half, 1.5 * base) < 1e-5
    assert t1["is_weight"] / t1["is_tokens"] == pytest.approx(1.5, rel=1e-5) and t1["is_capped"] == 0
    assert t1["staleness"] == len(make_samples(tiny_policy()[1]))  # one version behind, each sample
    capped, t2 = _weighted_step(math.log(3.0))
    assert rel(capped, 2.0 * base) < 1e-5
    assert t2["is_capped"] == t2["is_tokens"] > 0 and t2["is_weight_max"] == pytest.approx(3.0, rel=1e-5)
    off, _ = _weighted_step(math.log(3.0), tis_cap=0)
    assert torch.equal(off, base)
    current, t3 = _weighted_step(math.log(3.0), policy_version=1)  # sampled by the trained version (HF numerics)
    assert torch.equal(current, base) and t3["is_tokens"] == 0


def test_weight_layout_round_trips_and_sends_a_tied_weight_once():
    emb = torch.randn(5, 3)
    named = {"embed.weight": emb, "lm_head.weight": emb, "norm.weight": torch.randn(3),
             "steps": torch.tensor([7], dtype=torch.int64)}
    layout = WeightLayout.of(named, torch.bfloat16)
    assert layout.names == ["embed.weight", "norm.weight", "steps"]
    buffers = layout.flatten(named, "cpu")
    assert [b.dtype for b in buffers] == sorted([torch.bfloat16, torch.int64], key=str)
    back = dict(layout.unflatten(buffers))
    assert torch.equal(back["embed.weight"], emb.to(torch.bfloat16)) and back["steps"].item() == 7
    with pytest.raises(ValueError, match="norm.weight"):
        layout.flatten({"embed.weight": emb}, "cpu")


def test_engine_processes_serve_what_the_trainer_waits_on_first_and_report_a_dead_engine(tmp_path):
    """`generate` (what a step waits on: a continuation, a refill) goes before batches
    queued for later steps: it returns while the second of three queued batches has not
    started; the completions are the ones the same request gets alone."""
    from pyvf.runtime.model import load_model_and_tokenizer
    from pyvf.runtime.rollout.remote import EngineProcesses, EngineSpec

    model, tok = load_model_and_tokenizer("builtin")
    sd = model.state_dict()
    spec = EngineSpec("hf", model.config, tok, [tok.eos_token_id], WeightLayout.of(sd))
    engines = EngineProcesses(spec, 1, sd)
    try:
        out = engines.generate([[5, 6, 7]], 2, max_new_tokens=4, temperature=1.0, seeds=[3], stop=[])
        assert len(out[0]) == 2 and all(c.policy_version == 0 for c in out[0])
        batch = dict(max_new_tokens=48, temperature=1.0, seeds=list(range(16)), stop=[])
        queued = [engines.submit([[5, 6, 7]] * 16, 8, **batch) for _ in range(3)]
        urgent = engines.generate([[5, 6, 7]], 2, max_new_tokens=4, temperature=1.0, seeds=[3], stop=[])
        assert [[c.ids for c in g] for g in urgent] == [[c.ids for c in g] for g in out]
        assert not engines.ready(queued[1]) and not engines.ready(queued[2])
        for ticket in queued:
            engines.result(ticket)
        with pytest.raises(ValueError, match="not published"):
            engines.submit([[5]], 1, max_new_tokens=2, temperature=1.0, seeds=[1], version=3)
        engines._procs[0].kill()
        engines._procs[0].join()
        with pytest.raises(RuntimeError, match="engine process ended"):
            engines.generate([[5, 6, 7]], 1, max_new_tokens=4, temperature=1.0, seeds=[3], stop=[])
    finally:
        engines.close()


def test_ahead_modes_need_engine_processes(tmp_path):
    from pyvf.bench.train_step import ReplayEngine
    from pyvf.runtime.model import load_model_and_tokenizer
    from pyvf.train.config import ConfigError
    from pyvf.train.trainer import Trainer

    model, tok = load_model_and_tokenizer("builtin")
    cfg = config(rollout_mode="one_step_off", output_dir=str(tmp_path), progress=False, plot=False)
    with pytest.raises(ConfigError, match="submit"):
        Trainer.build(cfg, engine=ReplayEngine(tok, 8), model=model, tokenizer=tok)


def test_rollout_ranks_under_torchrun_match_one_process(tmp_path):
    """torchrun with 3 ranks and --rollout-ranks 1: ranks 0 and 1 train with FSDP2 (gloo),
    rank 2 samples for both and gets the weights from rank 0; one-step-off, the same run
    as one trainer process with one engine process."""
    import subprocess

    common = ["--rollout-mode", "one_step_off", "--max-steps", "3", "--device", "cpu", *FAST]
    single = run(tmp_path / "single", *common)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", "-m", "pyvf.cli",
           "train", "--rollout-ranks", "1", "--output-dir", str(tmp_path / "ranks"), *common]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "ranks" / "metrics.jsonl") as f:
        ranks = [json.loads(line) for line in f if line.strip()]
    assert [r["staleness"] for r in ranks] == [0.0, 1.0, 1.0]
    for a, b in zip(single, ranks):
        assert b["reward_mean"] == pytest.approx(a["reward_mean"], rel=1e-5, abs=1e-12)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-9)


def test_sigterm_to_the_process_group_checkpoints_the_batch_in_flight(tmp_path):
    """A scheduler's SIGTERM reaches the trainer and its engine process alike: the engine
    keeps serving, the trainer finishes the step, keeps the batch in flight in the
    checkpoint, exits 0, and the resumed run goes on from it."""
    import signal
    import subprocess
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pyvf.cli", "train", "--max-steps", "200", "--rollout-mode",
                             "one_step_off", "--output-dir", str(out), *FAST], stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    latest = (out / "checkpoints" / "latest").read_text()
    kept = torch.load(out / "checkpoints" / latest / "rollout.pt", weights_only=True)
    step = int(latest.removeprefix("step-"))
    assert [p["step"] for p in kept["ranks"][0]["pending"]] == [step + 1]
    assert cli(["train", "--resume", str(out), "--max-steps", str(step + 1), "--rollout-mode", "one_step_off"]) == 0


def test_async_with_an_engine_process_trains_the_demo_task(tmp_path):
    """The demo's task and settings (8 prompts x 8 samples, 48 new tokens), async with one
    engine process, at a larger learning rate for a short run: held-out accuracy rises
    on 100 held-out questions."""
    from pyvf.workflows.evaluate import evaluate_path

    out = tmp_path / "async"
    records = run(out, "--max-steps", "12", "--rollout-mode", "async", "--prompts-per-step", "8", "--group-size",
                  "8", "--max-new-tokens", "48", "--lr", "1e-4", "--micro-batch-tokens", "16384")
    assert max(r["staleness_max"] for r in records) == 1
    before = evaluate_path("builtin", "synthetic", 100, 64)["accuracy"]  # 28% on these 100
    after = evaluate_path(str(out / "checkpoints" / "step-000012"), "synthetic", 100, 64)["accuracy"]  # 37% measured
    assert after >= before + 0.04, (before, after)
