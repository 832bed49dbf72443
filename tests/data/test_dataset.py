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


def test_synthetic_choice_has_the_answer_and_the_shortcut_among_four_options():
    from pyvf.data import dataset, synthetic
    from pyvf.data.answers import normalize

    examples = dataset.load("synthetic-choice", n_synthetic=50, split="eval")
    problems = synthetic.generate(50, seed=dataset.SYNTHETIC_EVAL_SEED)
    assert examples == dataset.load("synthetic-choice", n_synthetic=50, split="eval")  # reproducible
    letters = []
    for ex, p in zip(examples, problems):
        assert len(ex.options) == 4 and len({normalize(o) for o in ex.options}) == 4
        letter, = ex.answers
        letters.append(letter)
        assert ex.options["ABCD".index(letter)] == p.answers[0]
        assert ex.category == p.template
        assert ex.question.startswith(p.question) and f"\n{letter}. {p.answers[0]}" in ex.question
        if normalize(p.shortcut_answer) != normalize(p.answers[0]):
            assert p.shortcut_answer in ex.options
    assert set(letters) == set("ABCD")  # the answer's place is drawn
