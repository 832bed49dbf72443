import json

import pytest

from pyvf.data.answers import is_equivalent, last_boxed, normalize
from pyvf.data.dataset import load_jsonl
from pyvf.data.synthetic import answer_forms, generate
from pyvf.train.config import ConfigError, TrainConfig, from_dict, load_file, parse_overrides


def test_overrides_parse_and_coerce():
    values = parse_overrides(["--max-steps", "2", "--objective", "verifree", "--seed=5", "--lr", "3e-4",
                              "--output-dir", "/tmp/x", "--progress", "false"])
    cfg = from_dict(values).validate()
    assert (cfg.max_steps, cfg.seed, cfg.lr, cfg.output_dir, cfg.progress) == (2, 5, 3e-4, "/tmp/x", False)


@pytest.mark.parametrize("args,match", [
    (["--max-stepz", "2"], "unknown config key 'max_stepz'"),
    (["--max-steps", "two"], "max_steps must be int"),
    (["--max-steps"], "--max-steps needs a value"),
    (["max-steps", "2"], "expected --key value"),
    (["--group-size", "1"], "group_size must be >= 2 for group advantages"),
    (["--objective", "ppo"], "objective must be one of"),
    (["--dtype", "float16"], "dtype must be one of float32, bfloat16"),
])
def test_bad_overrides(args, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(parse_overrides(args)).validate()


@pytest.mark.parametrize("suffix,text", [
    (".yaml", "max_steps: 7\nlr: 0.001\nobjective: verifree\n"),
    (".toml", "max_steps = 7\nlr = 0.001\nobjective = \"verifree\"\n"),
])
def test_config_files(tmp_path, suffix, text):
    path = tmp_path / f"cfg{suffix}"
    path.write_text(text)
    cfg = from_dict(load_file(path))
    assert cfg.max_steps == 7 and cfg.lr == 0.001
    cfg = from_dict(parse_overrides(["--max-steps", "3"]), base=cfg)
    assert cfg.max_steps == 3 and cfg.lr == 0.001


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_file(tmp_path / "missing.yaml")
    (tmp_path / "c.ini").write_text("x")
    with pytest.raises(ConfigError, match="must be .yaml"):
        load_file(tmp_path / "c.ini")
    (tmp_path / "c.yaml").write_text("bogus_key: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'bogus_key'"):
        from_dict(load_file(tmp_path / "c.yaml"))


def test_every_field_has_a_default():
    assert TrainConfig().validate().objective == "verifree"


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
        examples = load_jsonl(path)
    assert [e.question for e in examples] == ["What is 8/5?", "Fine"]
    assert examples[0].weights == (0.75, 0.25) and examples[1].answers == ("42",)
    assert "skipped 5 bad row(s)" in caplog.text


def test_empty_dataset_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps({"question": "", "answer": ""}) + "\n")
    with pytest.raises(ValueError, match="is empty"):
        load_jsonl(path)


def test_synthetic_task_is_reproducible_and_has_equivalent_forms():
    a, b = generate(50, seed=3), generate(50, seed=3)
    assert a == b and a != generate(50, seed=4)
    for p in a:
        assert all(is_equivalent(form, [p.answers[0]]) for form in p.answers)
    assert answer_forms(__import__("fractions").Fraction(8, 5)) == ("8/5", "1.6")
    assert answer_forms(__import__("fractions").Fraction(1, 3)) == ("1/3",)


@pytest.mark.parametrize("pred,refs,ok", [
    ("8/5", ["1.6"], True), ("1.60", ["8/5"], True), ("\\frac{8}{5}", ["1.6"], True),
    (" 13 ", ["13"], True), ("13.0", ["13"], True), ("14", ["13"], False), (None, ["1"], False),
    ("Paris", ["paris"], True), ("1/0", ["1"], False),
])
def test_answer_equivalence(pred, refs, ok):
    assert is_equivalent(pred, refs) is ok


def test_last_boxed():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{8}{5}} c") == "\\frac{8}{5}"
    assert last_boxed("no box") is None and last_boxed("\\boxed{unclosed") is None
    assert normalize("\\boxed{1.5}") == normalize("3/2")
