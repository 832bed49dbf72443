import json

import pytest
from choice_data import write_choice_file

from pyvf.cli import main as cli

BUILTIN = "builtin"


def test_eval_on_jsonl(tmp_path, capsys):
    data = tmp_path / "q.jsonl"
    rows = [{"question": p.question, "answer": list(p.answers)} for p in
            __import__("pyvf.data.synthetic", fromlist=["generate"]).generate(6, seed=99)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "eval.json"
    assert cli(["eval", "--model", BUILTIN, "--data", str(data), "--output", str(out)]) == 0
    result, = json.loads(out.read_text())["results"]
    assert result["n"] == 6 and result["answer_format"] == "math" and 0.0 <= result["accuracy"] <= 1.0
    assert result["correct"] == sum(sum(d["correct"]) for d in result["details"])
    assert result["avg@1"] == result["accuracy"] == result["correct"] / 6
    assert all(len(d["completions"]) == 1 for d in result["details"])
    assert f"| q.jsonl | math | 6 | {100 * result['avg@1']:.1f} |" in capsys.readouterr().out


def test_eval_avg_at_k_per_category_and_several_files(tmp_path, capsys):
    """The acceptance check on the HF engine: a multiple-choice file with categories and
    the synthetic task in one call, 4 samples each: one row per file, a per-category table,
    and numbers that are what the JSON's completions say. Each question samples from its
    own seed: another batch size gives the same completions."""
    data = tmp_path / "mc.jsonl"
    rows = write_choice_file(data, n=16)
    out, again = tmp_path / "eval.json", tmp_path / "again.json"
    args = ["eval", "--data", str(data), "synthetic", "--limit", "16", "--samples", "4", "--temperature", "1.0"]
    assert cli(args + ["--output", str(out)]) == 0
    printed = capsys.readouterr().out
    mc, syn = json.loads(out.read_text())["results"]
    assert (mc["data"], mc["answer_format"], syn["answer_format"]) == (str(data), "choice", "math")
    for result in (mc, syn):
        details = result["details"]
        assert result["n"] == 16 and all(len(d["completions"]) == 4 for d in details)
        assert result["avg@4"] == pytest.approx(sum(sum(d["correct"]) for d in details) / 64)
        assert result["pass@4"] == pytest.approx(sum(any(d["correct"]) for d in details) / 16)
        assert result["avg@4"] <= result["pass@4"]
    assert mc["avg@4"] > 0  # the shipped model boxes the right number often enough
    assert [d["answers"][0] for d in mc["details"]] == [r["answer"] for r in rows]
    assert all(p is None or p in "ABCD" for d in mc["details"] for p in d["predictions"])
    cats = mc["categories"]
    assert set(cats) == {"arithmetic", "sharing"} and sum(c["n"] for c in cats.values()) == 16
    for name, c in cats.items():
        mine = [d for d in mc["details"] if d["category"] == name]
        assert c["avg@4"] == pytest.approx(sum(sum(d["correct"]) for d in mine) / (4 * len(mine)))
    assert "| mc.jsonl | choice | 16 |" in printed and "| synthetic | math | 16 |" in printed
    assert "mc.jsonl by category:" in printed and "| sharing | 8 |" in printed
    assert cli(args + ["--batch-size", "3", "--output", str(again)]) == 0
    assert ([d["completions"] for r in json.loads(again.read_text())["results"] for d in r["details"]]
            == [d["completions"] for r in (mc, syn) for d in r["details"]])


def test_eval_answer_formats_and_errors(tmp_path, capsys):
    data = tmp_path / "mc.jsonl"
    write_choice_file(data, n=4)
    out = tmp_path / "eval.json"
    assert cli(["eval", "--data", str(data), "--answer-format", "text", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["results"][0]["answer_format"] == "text"
    assert cli(["eval", "--data", str(data), "--samples", "4"]) == 2
    assert "copies of the greedy answer" in capsys.readouterr().err
    assert cli(["eval", "--data", "synthetic-long", "--samples", "2", "--temperature", "1"]) == 2
    assert cli(["eval", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert cli(["eval", "--data", "openended"]) == 2
    assert "--data openended: question 0 has no reference answer" in capsys.readouterr().err


def test_final_number():
    from pyvf.workflows.evaluate import final_number

    assert final_number("... <answer> \\boxed{34 - 2 = 32. 32 / 4 = 8. The answer is 8.} </answer>") == "8"
    assert final_number("\\boxed{22/9}") == "22/9" and final_number("\\boxed{-1.5}") == "-1.5"
    assert final_number("no box 8") is None and final_number("\\boxed{eight}") is None


def test_eval_on_the_long_answer_task(tmp_path, capsys):
    """synthetic-long: the worked solution is the reference; eval reports the final
    number's accuracy against the short answers and the reference's per-token
    log-likelihood after the model's reasoning, for the same questions as synthetic."""
    from pyvf.data import dataset

    long, short = (dataset.load(spec, n_synthetic=8, split="eval") for spec in ("synthetic-long", "synthetic"))
    assert [ex.question for ex in long] == [ex.question for ex in short]
    for lo, sh in zip(long, short):
        assert len(lo.answers) == 1 and lo.answers[0].endswith(f"The answer is {sh.answers[0]}.")
        assert len(lo.answers[0]) > 3 * len(sh.answers[0])
    out = tmp_path / "eval.json"
    assert cli(["eval", "--model", BUILTIN, "--data", "synthetic-long", "--limit", "8", "--output", str(out)]) == 0
    result, = json.loads(out.read_text())["results"]
    assert result["n"] == 8 and result["correct"] == sum(d["correct"] for d in result["details"])
    assert all(d["reference_loglik"] < 0 for d in result["details"])
    assert result["reference_loglik"] == sum(d["reference_loglik"] for d in result["details"]) / 8
    assert "reference log-likelihood" in capsys.readouterr().out


def test_eval_under_torchrun_splits_the_questions_and_reads_the_same_answers(tmp_path):
    """Two processes each decode their share (9 questions: 5 and 4) and rank 0 reports
    exactly what one process does: the seeds are per question."""
    import os
    import subprocess
    import sys

    data = tmp_path / "mc.jsonl"
    write_choice_file(data, n=9)
    args = ["eval", "--data", str(data), "synthetic", "--limit", "9", "--samples", "2", "--temperature", "1.0"]
    assert cli(args + ["--output", str(tmp_path / "one.json")]) == 0
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "pyvf.cli", *args, "--output", str(tmp_path / "two.json")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("eval: model builtin") == 1 and "2 process(es)" in proc.stdout  # rank 0 reports
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert two["processes"] == 2
    assert [r["details"] for r in two["results"]] == [r["details"] for r in one["results"]]
