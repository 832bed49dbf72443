"""python:module:function verifiers: TRL-style reward functions unchanged, keyword
filtering, None as NaN, and loader errors that name the spec."""

import math
import textwrap

import pytest

from pyvf.verify import PythonVerifier, get_verifier, load_function

MODULE = textwrap.dedent('''
    seen = {}

    def trl_style(prompts, completions, **kwargs):
        """As TRL's docs write them: extra dataset columns arrive as keywords."""
        seen["kwargs"] = sorted(kwargs)
        seen["answer"] = kwargs.get("answer")
        seen["references"] = kwargs.get("references")
        return [float(len(c)) for c in completions]

    def plain(completions):
        return [1.0 if "yes" in c else 0.0 for c in completions]

    def matches(completions, answer, **kwargs):
        return [float(a in c) for c, a in zip(completions, answer)]

    def needs_label(completions, label):
        return [0.0] * len(completions)

    def some_none(completions, **kwargs):
        return [None if c == "skip" else 2 for c in completions]

    def too_few(completions, **kwargs):
        return [1.0]

    def not_numbers(completions, **kwargs):
        return ["high"] * len(completions)

    class Scorer:
        @staticmethod
        def score(completions, **kwargs):
            return [0.5] * len(completions)

    NOT_CALLABLE = 3
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = "pyvf_test_user_rewards"
    (tmp_path / f"{name}.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    import sys
    sys.modules.pop(name, None)


def test_trl_style_function_gets_prompts_completions_references_and_answer(user_module):
    v = get_verifier(f"python:{user_module}:trl_style")
    assert v.name == f"python:{user_module}:trl_style"
    assert v(["p", "p"], ["ab", "abcd"], [["8/5", "1.6"], ["3"]]) == [2.0, 4.0]
    import importlib
    seen = importlib.import_module(user_module).seen
    assert seen["kwargs"] == ["answer", "references"]
    assert seen["answer"] == ["8/5", "3"]                       # the canonical (first) reference
    assert seen["references"] == [["8/5", "1.6"], ["3"]]
    assert v(["p"], ["xyz"]) == [3.0]                           # no references: neither keyword
    assert seen["kwargs"] == []
    assert v.stats == {"none": 0, "scored": 3}


def test_keywords_are_filtered_for_functions_without_kwargs(user_module):
    assert get_verifier(f"python:{user_module}:plain")(["p", "q"], ["yes", "no"], [["1"], ["2"]]) == [1.0, 0.0]
    assert PythonVerifier(f"{user_module}:matches")(["p", "q"], ["is 12", "is 3"], [["12"], ["4"]]) == [1.0, 0.0]
    assert PythonVerifier(f"{user_module}:Scorer.score")(["p"], ["c"]) == [0.5]


def test_missing_arguments_are_named(user_module):
    with pytest.raises(ValueError, match="needs label, which pyvf does not pass"):
        PythonVerifier(f"{user_module}:needs_label")(["p"], ["c"], [["1"]])
    with pytest.raises(ValueError, match="needs answer"):
        PythonVerifier(f"{user_module}:matches")(["p"], ["c"])     # no references, so no answer


def test_none_becomes_nan_and_bad_returns_are_errors(user_module):
    v = PythonVerifier(f"{user_module}:some_none")
    out = v(["p", "p"], ["skip", "keep"])
    assert math.isnan(out[0]) and out[1] == 2.0
    assert v.stats["none"] == 1
    with pytest.raises(ValueError, match=r"must return one number per completion \(2\), got list of length 1"):
        PythonVerifier(f"{user_module}:too_few")(["p", "p"], ["a", "b"])
    with pytest.raises(ValueError, match="returned 'high' for completion 0"):
        PythonVerifier(f"{user_module}:not_numbers")(["p"], ["a"])


def test_loader_errors_name_the_spec(user_module):
    with pytest.raises(ValueError, match=r"verifier 'python:no_such_module_xyz:f': cannot import module"):
        load_function("python:no_such_module_xyz:f")
    with pytest.raises(ValueError, match=rf"verifier 'python:{user_module}:nope': module .* has no attribute 'nope'"):
        load_function(f"python:{user_module}:nope")
    with pytest.raises(ValueError, match="is not callable"):
        load_function(f"python:{user_module}:NOT_CALLABLE")
    with pytest.raises(ValueError, match=r"verifier 'python:justamodule' must be 'python:module:function'"):
        get_verifier("python:justamodule")
    with pytest.raises(ValueError, match="fn must be"):
        PythonVerifier(3)


def test_a_callable_directly():
    def reward(completions, **kwargs):
        return [float(len(completions))] * len(completions)

    v = PythonVerifier(reward)
    assert v.name.startswith("python:") and v.name.endswith("reward")
    assert v(["a", "b"], ["x", "y"]) == [2.0, 2.0]


def test_tensor_and_numpy_returns():
    import numpy as np
    import torch

    assert PythonVerifier(lambda completions: torch.tensor([0.5, 1.0]))(["a", "b"], ["x", "y"]) == [0.5, 1.0]
    assert PythonVerifier(lambda completions: [np.float32(0.25)])(["a"], ["x"]) == [0.25]
