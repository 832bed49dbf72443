"""`pyvf train --data` on the formats other trainers use, with no key flags: a verl
Parquet file (chat-message prompts, the reference under reward_model.ground_truth) and
a TRL `datasets` directory (prompt and solution columns)."""

import json
import math
import os

import pytest

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
