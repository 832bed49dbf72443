"""PCL: each formula against hand-computed examples and the behaviour of the official
code it was checked with (each test's docstring names the file and function;
docs/algorithms.md has the formulas and the deliberate differences)."""


import pytest

from pyvf.objectives.pcl import parse_pcl_reward, pcl_consistency, pcl_consistency_rewards

def test_parse_pcl_reward():
    """xfey/Post-Completion-Learning src/open_r1/rewards.py, rewarding_reward: the last <reward>...</reward>
    (non-greedy, DOTALL), tags stripped, evaluated as a Python list (pyvf: literals and + - * / only)."""
    assert parse_pcl_reward("<answer>3</answer>\n<evaluation>ok</evaluation>\n<reward>[1, 1]</reward>") == [1.0, 1.0]
    assert parse_pcl_reward("<reward>[0, 0]</reward> then <reward>\n[0.5, 1]\n</reward>") == [0.5, 1.0]
    assert parse_pcl_reward("<reward>(1, 0.25)</reward>") == [1.0, 0.25]
    assert parse_pcl_reward("<reward>[1/2, -1]</reward>") == [0.5, -1.0]
    for bad in ["no block", "<reward>[1, 1]", "<reward>1</reward>", "<reward>[nan, 1]</reward>",
                "<reward>[1, 'a']</reward>", "<reward>[1/0, 1]</reward>", "<reward>__import__('os')</reward>",
                "<reward>[x for x in ()]</reward>"]:
        assert parse_pcl_reward(bad) is None, bad


def test_pcl_consistency():
    """xfey/Post-Completion-Learning src/open_r1/rewards.py, rewarding_reward:
    1 - mean |gt - pred| / max(gt, pred); wrong length or a negative value -> 0; an exception -> 0.
    Deliberate difference: a 0/0 term is a perfect match here (the official raises and scores 0)."""
    assert pcl_consistency([1.0, 1.0], [1.0, 1.0]) == 1.0
    assert pcl_consistency([0.0, 1.0], [0.5, 1.0]) == pytest.approx(0.5)   # |0-0.5|/0.5 = 1, 0
    assert pcl_consistency([0.6, 1.0], [0.3, 0.5]) == pytest.approx(0.5)
    assert pcl_consistency([0.0, 1.0], [0.0, 1.0]) == 1.0                  # official: ZeroDivisionError -> 0
    assert pcl_consistency([0.0, 0.0], [0.0, 0.0]) == 1.0
    for bad in [None, [1.0], [1.0, 1.0, 1.0], [-0.5, 1.0], [float("nan"), 1.0]]:
        assert pcl_consistency([1.0, 1.0], bad) == 0.0, bad
    assert pcl_consistency([1.0, 1.0], [2.0, 1.0]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="ground_truth"):
        pcl_consistency([float("nan"), 1.0], [1.0, 1.0])
    r = pcl_consistency_rewards([[1, 1], [0, 1], [1, 0]],
                                ["<reward>[1, 1]</reward>", "<reward>[0, 1]</reward>", "no reward"])
    assert r.tolist() == [1.0, 1.0, 0.0]
