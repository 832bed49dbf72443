"""The vLLM rollout engine on the shipped model (runs in .ci/vllm.sh's virtual
environment; skipped where vLLM is not installed). One engine serves the module: starting
one takes seconds on a CPU."""

import pytest
import torch

from pyvf.runtime.rollout.vllm import vllm_available

if not vllm_available():
    pytest.skip("vLLM is not installed here; .ci/vllm.sh builds .venv-vllm and runs these tests",
                allow_module_level=True)

from pyvf.chat import stop_token_ids
from pyvf.data.synthetic import PROMPT_TEMPLATE
from pyvf.runtime.model import BUILTIN_MODEL_DIR, load_model_and_tokenizer
from pyvf.runtime.rollout.hf import StopChecker
from pyvf.runtime.rollout.vllm import VLLMEngine

QUESTIONS = ["What is 3 + 4?", "What is 12 * 7?", "What is 9 - 5?", "What is 8 / 2?"]


@pytest.fixture(scope="module")
def hf():
    model, tok = load_model_and_tokenizer("builtin")
    return model, tok


@pytest.fixture(scope="module")
def engine(tmp_path_factory, hf):
    model, tok = hf
    return VLLMEngine.from_model(BUILTIN_MODEL_DIR, stop_token_ids=stop_token_ids(model, tok), dtype=torch.float32,
                                 cache_dir=tmp_path_factory.mktemp("vllm-cache"), kv_cache_memory_bytes=64 << 20)


@pytest.fixture(scope="module")
def prompts(hf):
    _, tok = hf
    return [tok(PROMPT_TEMPLATE.format(question=q), add_special_tokens=False)["input_ids"] for q in QUESTIONS]


def sample(engine, prompts, seeds, **kw):
    kw = dict(dict(max_new_tokens=32, temperature=1.0, stop=[]), **kw)
    return engine.generate(prompts, 4, seeds=seeds, **kw)


def test_samples_depend_only_on_prompt_and_seed(engine, prompts):
    alone = sample(engine, [prompts[2]], [1234])[0]
    batch = sample(engine, prompts[::-1], [7, 1234, 8, 9])  # prompts[2] is second here
    assert [c.ids for c in alone] == [c.ids for c in batch[1]]
    for a, b in zip(alone, batch[1]):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    other_seed = sample(engine, [prompts[2]], [4321])[0]
    assert [c.ids for c in other_seed] != [c.ids for c in alone]
    # n samples of one prompt are distinct streams, not copies
    long = sample(engine, [prompts[0]], [5], max_new_tokens=48)[0]
    assert len({tuple(c.ids) for c in long}) > 1


def test_stop_strings_end_completions_like_the_hf_engine(engine, prompts, hf):
    _, tok = hf
    checker = StopChecker(tok, ["</answer>"])
    out = sample(engine, prompts, [11, 12, 13, 14], max_new_tokens=64, stop=["</answer>"])
    finishes = [c.finish for group in out for c in group]
    assert "stop" in finishes
    for c in (c for group in out for c in group):
        assert len(c.ids) == len(c.logprobs)
        # the HF engine's rule: the first token whose text completes a stop string ends it
        first = next((t + 1 for t in range(len(c.ids)) if checker(c.ids[:t + 1])), None)
        if c.finish == "stop":
            assert tok.decode(c.ids, skip_special_tokens=True).endswith("</answer>")
            assert first == len(c.ids)
        elif c.finish == "eos":
            assert c.ids[-1] in engine.stop_token_ids and first is None
        else:
            assert c.finish == "length" and len(c.ids) == 64 and first is None


def hf_logprobs(model, prompt, completion, temperature):
    """float64 log-probs of the completion's tokens under `model`."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1] / temperature
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None]).squeeze(1)


def max_logprob_error(engine, model, prompts, temperature):
    out = sample(engine, prompts[:2], [21, 22], temperature=temperature)
    return max((hf_logprobs(model, p, c.ids, temperature)
                - torch.tensor(c.logprobs, dtype=torch.float64)).abs().max().item()
               for p, group in zip(prompts, out) for c in group)


def test_update_weights_then_logprobs_match_the_trainer(engine, prompts, hf):
    model, _ = hf
    original = {k: v.clone() for k, v in model.state_dict().items()}
    reference = type(model)(model.config).double()
    reference.load_state_dict(original)
    assert max_logprob_error(engine, reference, prompts, 1.0) < 1e-4
    try:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in reference.parameters():  # the tied embedding moves the lm_head too
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        # Before the update the engine samples from the old weights: far off.
        assert max_logprob_error(engine, reference, prompts, 0.7) > 1e-2
        engine.update_weights((k, v.float()) for k, v in reference.state_dict().items())
        assert max_logprob_error(engine, reference, prompts, 0.7) < 1e-4
        assert max_logprob_error(engine, reference, prompts, 1.0) < 1e-4
    finally:
        engine.update_weights(original.items())
    reference.load_state_dict(original)
    assert max_logprob_error(engine, reference, prompts, 1.0) < 1e-4


def test_sleep_and_wake_keep_sampling(engine, prompts):
    before = sample(engine, prompts[:1], [3])
    engine.sleep()
    engine.wake()
    assert [c.ids for c in sample(engine, prompts[:1], [3])[0]] == [c.ids for c in before[0]]


def test_bad_arguments_are_value_errors(engine, prompts):
    with pytest.raises(ValueError, match="seeds"):
        engine.generate(prompts, 2, max_new_tokens=4, temperature=1.0, seeds=[1], stop=[])
    with pytest.raises(ValueError, match="temperature"):
        engine.generate(prompts[:1], 2, max_new_tokens=4, temperature=-1.0, seeds=[1], stop=[])


def test_temperature_zero_is_greedy_like_the_hf_engine(engine, prompts, hf):
    from pyvf.runtime.rollout import greedy

    model, tok = hf
    out = engine.generate(prompts, 1, max_new_tokens=32, temperature=0.0, seeds=[1, 2, 3, 4], stop=["</answer>"])
    want = greedy(model, tok, prompts, 32, stop=["</answer>"])
    assert [c.ids[:-1] if c.finish == "eos" else c.ids for c, in out] == want


def test_pyvf_eval_on_vllm(tmp_path, capsys):
    """The acceptance check on vLLM: avg@4 and pass@4 with per-category accuracy for a
    multiple-choice file, and greedy answers that are the HF engine's."""
    import json

    from choice_data import write_choice_file

    from pyvf.cli import main as cli

    data = tmp_path / "mc.jsonl"
    write_choice_file(data, n=16)
    assert cli(["eval", "--rollout", "vllm", "--data", str(data), "--samples", "4", "--temperature", "1.0",
                "--output", str(tmp_path / "sampled.json")]) == 0
    printed = capsys.readouterr().out
    result, = json.loads((tmp_path / "sampled.json").read_text())["results"]
    assert result["answer_format"] == "choice" and result["n"] == 16
    assert result["avg@4"] == pytest.approx(sum(sum(d["correct"]) for d in result["details"]) / 64)
    assert 0 < result["avg@4"] <= result["pass@4"]
    assert set(result["categories"]) == {"arithmetic", "sharing"}
    assert "engine vllm" in printed and "| mc.jsonl | choice | 16 |" in printed and "| sharing | 8 |" in printed
    greedy = {}
    for rollout in ("vllm", "hf"):
        out = tmp_path / f"{rollout}.json"
        assert cli(["eval", "--rollout", rollout, "--data", str(data), "--output", str(out)]) == 0
        greedy[rollout], = json.loads(out.read_text())["results"]
    assert [d["completions"] for d in greedy["vllm"]["details"]] == [d["completions"] for d in greedy["hf"]["details"]]


def test_train_with_vllm_keeps_the_engine_in_sync(tmp_path):
    """`pyvf train --rollout vllm` with lr 1e-3 (large steps: an engine that missed a weight
    push would sample from weights far from the trainer's): the engine's log-prob of every
    sampled token matches the trainer's within 1e-3 at every step, losses are finite,
    and a resumed run continues with the engine on the checkpoint's weights."""
    import json
    import math

    from pyvf.cli import main as cli

    out = tmp_path / "run"
    args = ["train", "--rollout", "vllm", "--max-steps", "3", "--lr", "1e-3", "--prompts-per-step", "4",
            "--group-size", "4", "--max-new-tokens", "40", "--n-synthetic", "64", "--progress", "false",
            "--plot", "false", "--output-dir", str(out), "--eval-data", "synthetic", "--eval-limit", "8"]
    assert cli(args + ["--stop-after", "2"]) == 0
    assert cli(["train", "--resume", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert math.isfinite(r["loss"]) and r["rollout_logprob_diff"] <= 1e-3, r
        assert r["time_weight_sync"] > 0
    # The held-out evaluation after the last step decodes greedily on the engine, which has
    # the trained weights: `pyvf eval` of the final checkpoint on HF reads the same answers,
    # `pyvf eval --rollout vllm` of the run (its DCP checkpoint written out as a model
    # directory for vLLM) reads them too.
    during = json.loads((out / "eval" / "step-000003.json").read_text())
    assert "eval_accuracy" in records[-1] and during["n"] == 8
    for rollout in ("hf", "vllm"):
        after = tmp_path / f"after-{rollout}.json"
        assert cli(["eval", "--rollout", rollout, "--model", str(out), "--data", "synthetic", "--limit", "8",
                    "--max-new-tokens", "40", "--output", str(after)]) == 0
        result, = json.loads(after.read_text())["results"]
        assert [d["predictions"] for d in result["details"]] == [d["predictions"] for d in during["details"]]


def test_vllm_in_an_engine_process_one_step_off(tmp_path):
    """`--rollout vllm --rollout-mode one_step_off`: vLLM runs in its own process and gets
    the weights over gloo. Batch t is sampled with the weights after step t-2, and every
    sampled token takes a TIS weight (vLLM's numerics are not the trainer's), near 1 at
    this learning rate; the engine's log-probs of the first batch (no lag yet) match the
    trainer's."""
    import json
    import math

    from pyvf.cli import main as cli

    out = tmp_path / "run"
    assert cli(["train", "--rollout", "vllm", "--rollout-mode", "one_step_off", "--max-steps", "3", "--lr", "1e-4",
                "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "40", "--n-synthetic", "64",
                "--progress", "false", "--plot", "false", "--output-dir", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["staleness"] for r in records] == [0.0, 1.0, 1.0]
    assert records[0]["rollout_logprob_diff"] <= 1e-3
    for r in records:
        assert math.isfinite(r["loss"]) and r["is_weight"] != 1.0 and 0.9 < r["is_weight"] < 1.1, r


def test_pyvf_eval_on_vllm_under_torchrun(tmp_path):
    """Two processes, a vLLM engine each beside the job's process group: each decodes its
    share, rank 0 reports the greedy answers one HF process reads, and both exit cleanly
    (the engines shut down before the group: no traceback at exit)."""
    import json
    import os
    import subprocess
    import sys

    from pyvf.cli import main as cli

    args = ["eval", "--data", "synthetic", "--limit", "6"]
    assert cli(args + ["--output", str(tmp_path / "hf.json")]) == 0
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "pyvf.cli", *args, "--rollout", "vllm", "--output", str(tmp_path / "vllm.json")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    hf, = json.loads((tmp_path / "hf.json").read_text())["results"]
    two = json.loads((tmp_path / "vllm.json").read_text())
    assert two["processes"] == 2
    assert [d["completions"] for d in two["results"][0]["details"]] == [d["completions"] for d in hf["details"]]
