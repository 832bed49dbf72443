"""Data files in the formats users have (pyvf.data.files): every format written here by the
test, verl and TRL rows found without flags, dotted keys, multiple-choice rows, and the
errors that name what is missing."""

import json
import logging
import sys

import pytest

from pyvf.data.files import DataKeys, choice_letter, load_examples

VERL_ROWS = [
    {"data_source": "gsm", "prompt": [{"role": "system", "content": "Think first."},
                                      {"role": "user", "content": "What is 3 + 4?"}],
     "reward_model": {"ground_truth": "7", "style": "rule"}},
    {"data_source": "gsm", "prompt": [{"role": "user", "content": "What is 2 * 5?"}],
     "reward_model": {"ground_truth": "10", "style": "rule"}},
]
TRL_ROWS = [{"prompt": "What is 9 - 4?", "solution": "5"}, {"prompt": "What is 1 + 1?", "solution": "2"},
            {"prompt": "", "solution": "3"}]
CHOICE_ROWS = [
    {"question": "Which is a prime?", "options": ["4", "6", "7", "9"], "answer": "C", "category": "math"},
    {"question": "Water boils at?", "options": ["50 C", "100 C"], "answer": 1, "category": "physics"},
    {"question": "Largest planet?", "options": ["Mars", "Jupiter"], "answer": "Jupiter", "category": "astronomy"},
    {"question": "Out of range", "options": ["a", "b"], "answer": "E", "category": "x"},
]


def data_extra():
    """The `datasets` library, or a skip where it does not import (the lower-bounds job:
    its pandas and pyarrow need numpy >= 2)."""
    return pytest.importorskip("datasets", reason="the data extra (datasets; in the test extra) does not import "
                                                  "here (its pandas and pyarrow need numpy >= 2)")


def test_verl_parquet_rows_need_no_flags(tmp_path, caplog):
    datasets = data_extra()

    path = tmp_path / "train.parquet"
    datasets.Dataset.from_list(VERL_ROWS).to_parquet(str(path))
    with caplog.at_level(logging.INFO, logger="pyvf"):
        examples = load_examples(path)
    assert [e.answers for e in examples] == [("7",), ("10",)]
    assert examples[0].messages == (("system", "Think first."), ("user", "What is 3 + 4?"))
    assert examples[0].question == "What is 3 + 4?"
    assert "via parquet: question from prompt (chat messages), answer from reward_model.ground_truth" in caplog.text


def test_trl_datasets_directory_and_its_splits(tmp_path, caplog):
    datasets = data_extra()

    one = tmp_path / "one"
    datasets.Dataset.from_list(TRL_ROWS).save_to_disk(str(one))
    with caplog.at_level(logging.WARNING, logger="pyvf"):
        examples = load_examples(one)
    assert [(e.question, e.answers) for e in examples] == [("What is 9 - 4?", ("5",)), ("What is 1 + 1?", ("2",))]
    assert "skipped 1 bad row(s)" in caplog.text
    several = tmp_path / "several"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(TRL_ROWS[:1]),
                          "validation": datasets.Dataset.from_list(TRL_ROWS[1:2])}).save_to_disk(str(several))
    with pytest.raises(ValueError, match="holds the splits test, validation: choose one with --split"):
        load_examples(several)
    assert load_examples(several, DataKeys(split="validation"))[0].answers == ("2",)


def test_csv_json_and_dotted_keys(tmp_path):
    nested = tmp_path / "d.json"
    nested.write_text(json.dumps({"train": [{"q": {"text": "Say hi"}, "refs": {"all": ["hi", "hello"]},
                                             "w": [3, 1]}]}))
    keys = DataKeys(question="q.text", answer="refs.all", weights="w")
    (ex,) = load_examples(nested, keys)
    assert ex.question == "Say hi" and ex.answers == ("hi", "hello") and ex.weights == (0.75, 0.25)
    with pytest.raises(ValueError, match=r"has no column 'q.body' \(--question-key\); its columns: q, q.text, refs"):
        load_examples(nested, DataKeys(question="q.body"))
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"text": "x", "output_text": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"has no question column .* --question-key; its columns: text, output_text"):
        load_examples(bare)
    with pytest.raises(ValueError, match="not a file pyvf reads"):
        (tmp_path / "d.txt").write_text("x")
        load_examples(tmp_path / "d.txt")
    data_extra()
    csv = tmp_path / "d.csv"
    csv.write_text("problem,answer\nWhat is 6 / 3?,2\nWhat is 7 - 7?,0\n")
    assert [e.answers for e in load_examples(csv)] == [("2",), ("0",)]  # numbers read as numbers, kept as text


def test_without_the_data_extra_parquet_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"needs the datasets library: pip install \"pyvf\[data\]\""):
        load_examples(tmp_path / "d.parquet")


def test_multiple_choice_rows_become_lettered_questions(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in CHOICE_ROWS) + "\n")
    examples = load_examples(path)
    assert [e.answers for e in examples] == [("C",), ("B",), ("B",)]  # the out-of-range letter is a bad row
    assert examples[0].question == "Which is a prime?\nA. 4\nB. 6\nC. 7\nD. 9"
    assert choice_letter("(b)", ["x", "y"]) == "B" and choice_letter("1", ["x", "y"]) == "B"
    assert choice_letter(True, ["x", "y"]) is None and choice_letter("z", ["x", "y"]) is None
    assert examples[0].options == ("4", "6", "7", "9")
    assert [e.category for e in examples] == ["math", "physics", "astronomy"]


def test_category_column_found_or_named(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"question": "1 + 1?", "answer": "2", "data_source": "gsm8k",
                                                       "topic": "sums"}]) + "\n")
    assert load_examples(path)[0].category == "gsm8k"
    assert load_examples(path, DataKeys(category="topic"))[0].category == "sums"
    assert load_examples(path)[0].options == ()
    with pytest.raises(ValueError, match=r"no column 'area' \(--category-key\); its columns: question, answer"):
        load_examples(path, DataKeys(category="area"))


def test_worked_solutions_become_their_final_answers(tmp_path, caplog):
    """GSM8K's answers end in "#### 72"; MATH's and open-r1's solutions box the answer:
    the reference is that final answer (what their own graders compare)."""
    path = tmp_path / "mixed.jsonl"
    rows = [{"question": "Clips?", "answer": "She sold 48 / 2 = 24 clips in May.\n#### 72"},
            {"problem": "Half?", "solution": "Divide by two: $\\boxed{\\frac{1}{2}}$."},
            {"question": "Plain?", "answer": "8"}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:1] + rows[2:]) + "\n")
    with caplog.at_level(logging.INFO, logger="pyvf"):
        assert [e.answers for e in load_examples(path)] == [("72",), ("8",)]
    assert "1 reference(s) of mixed.jsonl end in a final answer" in caplog.text
    math = tmp_path / "math.jsonl"
    math.write_text(json.dumps(rows[1]) + "\n")
    assert load_examples(math)[0].answers == ("\\frac{1}{2}",)


def test_column_names_are_found_whatever_their_case(tmp_path):
    path = tmp_path / "gpqa.jsonl"
    path.write_text(json.dumps({"Question": "Which?", "Options": ["x", "y"], "Answer": "B", "Subject": "bio"}) + "\n")
    ex, = load_examples(path)
    assert (ex.question, ex.answers, ex.options, ex.category) == ("Which?\nA. x\nB. y", ("B",), ("x", "y"), "bio")
