"""The majority verifier: groups by prompt, equivalence classes, ties to the first class."""

import pytest

from pyvf.verify import MajorityVerifier, answer_classes, get_verifier, majority_vote


def box(a):
    return f"reasoning <answer> \\boxed{{{a}}} </answer>"


@pytest.mark.parametrize("backend", ["auto", "normalizer"])
def test_majority_hand_computed(backend):
    v = MajorityVerifier(backend=backend)
    prompts = ["p"] * 5 + ["q"] * 3
    # p: 8/5, 1.6 and \frac{8}{5} are one class of 3 votes against 2 votes for 7.
    # q: a tie 1 vs 2 (one vote each) and no answer: the first class (1) wins.
    completions = [box("7"), box("8/5"), box("1.6"), box("7"), box("\\frac{8}{5}"),
                   "no answer here", box("2"), box("1")]
    assert v(prompts, completions) == [0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert v.stats == {"scored": 8, "no_answer": 1, "groups": 2}


def test_majority_groups_by_prompt_not_position():
    v = get_verifier("majority", backend="normalizer")
    # Interleaved groups: a and b each decide their own majority.
    prompts = ["a", "b", "a", "b", "a"]
    completions = [box("1"), box("5"), box("1"), box("6"), box("2")]
    assert v(prompts, completions) == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_majority_without_votes_and_single_completion():
    v = MajorityVerifier(backend="normalizer")
    assert v(["p", "p"], ["none", "nothing"]) == [0.0, 0.0]
    assert v(["alone"], [box("3")]) == [1.0]


def test_majority_vote_and_classes():
    answers = [None, "2", "0.5", "1/2", "2.0", "3"]
    assert answer_classes(answers, backend="normalizer") == [None, 0, 1, 1, 0, 2]
    # classes 0 and 1 tie at 2 votes: class 0 (first seen at index 1) wins
    assert majority_vote(answers, backend="normalizer") == (1, pytest.approx(2 / 5))
    assert majority_vote([None, None]) == (None, 0.0)
    assert majority_vote(["x", "y", "y"], backend="normalizer") == (1, pytest.approx(2 / 3))


def test_majority_ignores_references_but_checks_them():
    v = MajorityVerifier(backend="normalizer")
    assert v(["p", "p"], [box("1"), box("1")], [["9"], ["9"]]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="one entry per completion"):
        v(["p", "p"], [box("1"), box("1")], [["9"]])
