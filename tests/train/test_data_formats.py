"""`pyvf train --data` on the formats other trainers use, with no key flags: a verl
Parquet file (chat-message prompts, the reference under reward_model.ground_truth) and
a TRL `datasets` directory (prompt and solution columns); held-out evaluation during
training (`--eval-data`)."""

import json
import math
import os

import pytest
from choice_data import write_choice_file

from pyvf.cli import main as cli

FAST = ["--max-steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "16",
        "--progress", "false", "--plot", "false"]
QUESTIONS = [("A jug holds 3 liters and 10 more are added. How many liters?", "13"),
             ("There are 12 apples shared by 4 children. How many each?", "3"),
             ("A pack has 6 pens. How many pens in 5 packs?", "30")]


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_train_on_verl_parquet_and_trl_datasets_directory(tmp_path, caplog):
    datasets = pytest.importorskip("datasets", reason="the data extra (datasets; in the test extra) does not "
                                               "import here (its pandas and pyarrow need numpy >= 2)")

    verl = tmp_path / "verl.parquet"
    datasets.Dataset.from_list([{"data_source": "synthetic", "ability": "math",
                                 "prompt": [{"role": "user", "content": q}],
                                 "reward_model": {"style": "rule", "ground_truth": a}} for q, a in QUESTIONS]
                               ).to_parquet(str(verl))
    trl = tmp_path / "trl"
    datasets.Dataset.from_list([{"prompt": q, "solution": a} for q, a in QUESTIONS]).save_to_disk(str(trl))
    for data in (verl, trl):
        out = tmp_path / f"run-{data.stem}"
        with caplog.at_level("INFO", logger="pyvf"):
            assert cli(["train", "--data", str(data), "--output-dir", str(out), *FAST]) == 0
        records = _metrics(out)
        assert [r["step"] for r in records] == [1, 2]
        assert all(math.isfinite(r["loss"]) for r in records)
    assert "question from prompt (chat messages), answer from reward_model.ground_truth" in caplog.text
    assert "question from prompt (text), answer from solution" in caplog.text


def test_eval_during_training_is_what_pyvf_eval_reports(tmp_path, capsys):
    """`--eval-data` with `--eval-every 1`: every step logs avg@2, pass@2 and the
    per-category accuracy, with every completion in eval/step-N.json; the last one is
    exactly what `pyvf eval` says of the final checkpoint (same prompts, seed, weights)."""
    data = tmp_path / "mc.jsonl"
    write_choice_file(data, n=8)
    out = tmp_path / "run"
    evaluation = ["--eval-samples", "2", "--eval-temperature", "1.0"]
    assert cli(["train", "--eval-data", str(data), "--eval-every", "1", *evaluation, "--output-dir", str(out),
                *FAST]) == 0
    records = _metrics(out)
    for r in records:
        assert 0 <= r["eval_accuracy"] <= r["eval_pass@2"] <= 1
        assert set(k for k in r if k.startswith("eval_accuracy/")) == {"eval_accuracy/arithmetic",
                                                                       "eval_accuracy/sharing"}
    during = json.loads((out / "eval" / "step-000002.json").read_text())
    assert during["n"] == 8 and during["answer_format"] == "choice" and during["avg@2"] == records[-1]["eval_accuracy"]
    assert cli(["eval", "--model", str(out), "--data", str(data), "--samples", "2", "--temperature", "1.0",
                "--max-new-tokens", "16", "--output", str(tmp_path / "after.json")]) == 0
    after, = json.loads((tmp_path / "after.json").read_text())["results"]
    assert [d["completions"] for d in after["details"]] == [d["completions"] for d in during["details"]]
    assert after["categories"] == during["categories"]
    assert cli(["train", "--eval-every", "2", "--output-dir", str(tmp_path / "bad"), *FAST]) == 2
    assert "eval_every 2 needs eval_data" in capsys.readouterr().err
    assert cli(["train", "--eval-data", "synthetic-long", "--output-dir", str(tmp_path / "bad"), *FAST]) == 2
    assert "no answer format grades" in capsys.readouterr().err
