import json

from pyvf.cli import main as cli

BUILTIN = "builtin"


def test_eval_on_jsonl(tmp_path):
    data = tmp_path / "q.jsonl"
    rows = [{"question": p.question, "answer": list(p.answers)} for p in
            __import__("pyvf.data.synthetic", fromlist=["generate"]).generate(6, seed=99)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "eval.json"
    assert cli(["eval", "--model", BUILTIN, "--data", str(data), "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 6 and 0.0 <= result["accuracy"] <= 1.0
    assert result["correct"] == sum(d["correct"] for d in result["details"])


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
    result = json.loads(out.read_text())
    assert result["n"] == 8 and result["correct"] == sum(d["correct"] for d in result["details"])
    assert all(d["reference_loglik"] < 0 for d in result["details"])
    assert result["reference_loglik"] == sum(d["reference_loglik"] for d in result["details"]) / 8
    assert "reference log-likelihood" in capsys.readouterr().out
