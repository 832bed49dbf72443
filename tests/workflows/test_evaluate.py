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
