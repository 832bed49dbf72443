"""The rule verifier: last \\boxed{} answer against the references (equivalence itself is
pinned in tests/test_answers.py)."""

import pytest

from pyvf.data import answers
from pyvf.verify import RuleVerifier, get_verifier


@pytest.mark.parametrize("backend", ["auto", "normalizer"])
def test_rule_scores_hand_computed(backend):
    v = RuleVerifier(backend=backend)
    completions = ["so 8/5. <answer> \\boxed{1.6} </answer>",   # equivalent form: 1
                   "\\boxed{2} then \\boxed{ 13 }",             # the LAST box counts: 1
                   "no box at all",                             # no answer: 0
                   "\\boxed{7}",                                # wrong: 0
                   "\\boxed{\\frac{1}{2}}"]                     # second reference matches: 1
    refs = [["8/5"], ["13"], ["1"], ["8"], ["3", "0.5"]]
    assert v(["q"] * 5, completions, refs) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert v.stats == {"no_answer": 1, "scored": 5, "correct": 3}
    v.reset_stats()
    assert v.stats == {}


def test_rule_needs_references():
    v = get_verifier("rule")
    with pytest.raises(ValueError, match="references"):
        v(["q"], ["\\boxed{1}"])
    with pytest.raises(ValueError, match=r"references\[1\] is empty"):
        v(["q", "q"], ["\\boxed{1}", "\\boxed{2}"], [["1"], []])
    with pytest.raises(ValueError, match="one entry per completion"):
        v(["q", "q"], ["a", "b"], [["1"]])
    with pytest.raises(ValueError, match="same length"):
        v(["q"], ["a", "b"], [["1"], ["2"]])
    with pytest.raises(ValueError, match=r"completions\[0\] must be a string"):
        v(["q"], [3], [["1"]])
    with pytest.raises(ValueError, match="backend"):
        RuleVerifier(backend="sympy")


def test_rule_single_string_reference_is_a_list_of_one(monkeypatch):
    monkeypatch.setattr(answers, "USE_MATH_VERIFY", False)
    v = RuleVerifier()
    assert v(["q", "q"], ["\\boxed{0.25}", "\\boxed{4}"], ["1/4", "5"]) == [1.0, 0.0]
