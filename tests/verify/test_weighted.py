"""Weighted sums of verifiers, and get_verifier's spec parsing."""

import math

import pytest

from pyvf.data import answers
from pyvf.verify import (
    MajorityVerifier, PythonVerifier, RuleVerifier, SelfRubric, Weighted, get_verifier, register_verifier,
    verifier_names,
)


class Fixed:
    """A user verifier without stats: the protocol needs only `name` and the call."""

    def __init__(self, name, scores):
        self.name, self.scores = name, scores

    def __call__(self, prompts, completions, references=None):
        return list(self.scores)


def test_weighted_sum_hand_computed():
    w = Weighted([(Fixed("a", [1.0, 0.0, 0.5]), 0.5), (Fixed("b", [0.2, 1.0, 0.0]), 2.0)])
    assert w(["p"] * 3, ["x"] * 3) == pytest.approx([0.5 + 0.4, 2.0, 0.25])
    assert w.name == "0.5*a+2*b"
    assert w.stats == {}


def test_weighted_leaves_nan_out():
    w = Weighted([(Fixed("a", [float("nan"), float("nan"), 1.0]), 1.0), (Fixed("b", [3.0, float("nan"), 1.0]), -1.0)])
    out = w(["p"] * 3, ["x"] * 3)
    assert out[0] == -3.0 and math.isnan(out[1]) and out[2] == 0.0


def test_weighted_rule_and_majority(monkeypatch):
    monkeypatch.setattr(answers, "USE_MATH_VERIFY", False)
    v = get_verifier("rule + 0.5*majority")
    completions = ["\\boxed{3}", "\\boxed{3}", "\\boxed{4}", "none"]
    # rule: [0, 0, 1, 0] against reference 4; majority of the group: 3 -> [1, 1, 0, 0]
    assert v(["p"] * 4, completions, [["4"]] * 4) == [0.5, 0.5, 1.0, 0.0]
    assert v.stats == {"rule/no_answer": 1, "rule/scored": 4, "rule/correct": 1, "majority/scored": 4,
                       "majority/no_answer": 1, "majority/groups": 1}
    v.reset_stats()
    assert v.stats == {}


def test_weighted_checks_its_parts():
    with pytest.raises(ValueError, match="at least one"):
        Weighted([])
    with pytest.raises(ValueError, match=r"parts\[0\] must be a \(verifier, weight\) pair"):
        Weighted([RuleVerifier()])
    with pytest.raises(ValueError, match=r"parts\[1\]: weight must be a finite number"):
        Weighted([(RuleVerifier(), 1.0), (MajorityVerifier(), float("inf"))])
    with pytest.raises(ValueError, match=r"parts\[0\]: 'rule' is not a verifier"):
        Weighted([("rule", 1.0)])
    w = Weighted([(Fixed("a", [1.0]), 1.0)])
    with pytest.raises(ValueError, match="returned 1 scores for 2 completions"):
        w(["p", "p"], ["x", "y"])


@pytest.mark.parametrize("spec, name", [
    ("rule", "rule"),
    (" majority ", "majority"),
    ("rule+majority", "rule+majority"),
    ("rule + 0.5*majority", "rule+0.5*majority"),
    ("majority*0.5+rule", "0.5*majority+rule"),
    ("rule+-0.2*majority", "rule+-0.2*majority"),
    ("1e+1*rule", "10*rule"),
    ("2*rule", "2*rule"),
    (["rule", ("majority", 0.25)], "rule+0.25*majority"),
    ([("rule + majority", 2.0)], "2*rule+2*majority"),
])
def test_spec_parsing(spec, name):
    v = get_verifier(spec)
    assert v.name == name
    assert isinstance(v, Weighted) == ("+" in name or "*" in name)
    assert get_verifier(v.name).name == name  # names read back as specs


def test_spec_errors():
    with pytest.raises(ValueError, match="unknown verifier 'judge'; known: rule, majority"):
        get_verifier("judge")
    with pytest.raises(ValueError, match="term 'a\\*b' must be NAME"):
        get_verifier("rule+a*b")
    with pytest.raises(ValueError, match="names no verifier"):
        get_verifier("  ")
    with pytest.raises(ValueError, match="must be a string, a verifier or a list"):
        get_verifier(3)
    with pytest.raises(ValueError, match="give model= .* or policy="):
        get_verifier("verifree", tokenizer=object())


def test_context_goes_to_each_verifier_and_instances_pass_through():
    v = get_verifier(["selfrubric", ("rule", 0.5)], rubric="story", backend="normalizer")
    kinds = [type(p) for p, _ in v.parts]
    assert kinds == [SelfRubric, RuleVerifier] and v.parts[1][0].backend == "normalizer"
    mine = Fixed("mine", [0.3])
    assert get_verifier(mine) is mine
    assert get_verifier([(mine, 2.0)]).name == "2*mine"


def test_register_verifier():
    register_verifier("constant_one", lambda **context: PythonVerifier(lambda completions: [1.0] * len(completions),
                                                                        name="constant_one"))
    assert "constant_one" in verifier_names()
    assert get_verifier("constant_one*3")(["p"], ["x"]) == [3.0]
    with pytest.raises(ValueError, match="not 'python'"):
        register_verifier("python", lambda **c: None)


def test_builtins_satisfy_the_protocol():
    from pyvf.verify import Verifier

    for v in (RuleVerifier(), MajorityVerifier(), SelfRubric("story"), Weighted([(RuleVerifier(), 1.0)]),
              PythonVerifier(lambda completions: [0.0] * len(completions)), Fixed("f", [])):
        assert isinstance(v, Verifier)
        assert isinstance(getattr(v, "stats", {}), dict)
