import json

import pytest

from pyvf.data.files import load_examples


def test_jsonl_skips_and_counts_bad_rows(tmp_path, caplog):
    rows = [
        {"question": "What is 8/5?", "answer": ["8/5", "1.6"], "weights": [3, 1]},
        {"question": "", "answer": "1"},
        {"question": "No answer"},
        {"question": "Empty list", "answer": []},
        {"question": "Bad weights", "answer": ["1"], "weights": [1, 2]},
        {"question": "Fine", "answer": "  42 "},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    with caplog.at_level("WARNING", logger="pyvf"):
        examples = load_examples(path)
    assert [e.question for e in examples] == ["What is 8/5?", "Fine"]
    assert examples[0].weights == (0.75, 0.25) and examples[1].answers == ("42",)
    assert "skipped 5 bad row(s)" in caplog.text


def test_empty_dataset_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps({"question": "", "answer": ""}) + "\n")
    with pytest.raises(ValueError, match="is empty"):
        load_examples(path)
