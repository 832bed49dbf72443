"""The verifier baseline: each formula against hand-computed examples and the behaviour of the official
code it was checked with (each test's docstring names the file and function;
docs/algorithms.md has the formulas and the deliberate differences)."""


import pytest

from pyvf.objectives.verifier import verifier_rewards


def test_verifier_rewards():
    """Binary reward on the last \\boxed{}; the equivalence backends are pinned in test_answers.py."""
    completions = ["... so 8/5. <answer> \\boxed{1.6} </answer>", "\\boxed{2} then \\boxed{ 13 }", "no box", "\\boxed{7}"]
    refs = [["8/5"], ["13"], ["1"], ["8"]]
    for backend in ("auto", "normalizer"):
        assert verifier_rewards(completions, refs, backend=backend).tolist() == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="same length"):
        verifier_rewards(["x"], [])
