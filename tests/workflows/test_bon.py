"""`pyvf bon`: best-of-N with a perfect verifier rises with N (to the oracle), with a
random one stays flat; majority voting on samples whose right answer is the plurality
rises; ties and NaN; the command on the shipped model writes the table JSON and PNG."""

import functools
import json
import random

import pytest

from pyvf.verify import get_verifier
from pyvf.workflows import bon
from pyvf.workflows.bon import parse_ns, pick_best

NS = [1, 2, 4, 8, 16]
# pyvf's own answer comparison (exact fractions): as strict as math-verify on these
# integers, and fast.
best_of_n_curve = functools.partial(bon.best_of_n_curve,
                                    correctness=functools.partial(bon.rule_correctness, backend="normalizer"))


def planted(n_questions=400, n_samples=16, p_correct=0.3, seed=0):
    """Question i's answer is i; each sample is right with probability p_correct, else
    one of three wrong answers (so the right one is usually the plurality of 16)."""
    rng = random.Random(seed)
    prompts = [f"Question {i}?" for i in range(n_questions)]
    completions = [[f" work. <answer> \\boxed{{{i if rng.random() < p_correct else 1000 + rng.randrange(3)}}} "
                    f"</answer>" for _ in range(n_samples)] for i in range(n_questions)]
    references = [[str(i)] for i in range(n_questions)]
    return prompts, completions, references


class RandomVerifier:
    name = "random"

    def __init__(self, seed=0):
        self.rng = random.Random(seed)

    def __call__(self, prompts, completions, references=None):
        return [self.rng.random() for _ in completions]


def test_a_perfect_verifier_rises_with_n():
    prompts, completions, references = planted()
    curve = best_of_n_curve(prompts, completions, references, NS, get_verifier("rule", backend="normalizer"))
    acc = [row["accuracy"] for row in curve]
    assert all(b >= a for a, b in zip(acc, acc[1:])), acc
    assert acc[NS.index(8)] > acc[0] + 0.3, acc
    assert acc == [row["oracle"] for row in curve]  # a perfect verifier picks a right one whenever there is one
    # the oracle of N i.i.d. samples: 1 - (1 - p)^N
    assert acc[0] == pytest.approx(0.3, abs=0.07)
    assert acc[NS.index(4)] == pytest.approx(1 - 0.7 ** 4, abs=0.07)


def test_a_random_verifier_stays_flat():
    prompts, completions, references = planted()
    curve = best_of_n_curve(prompts, completions, references, NS, RandomVerifier())
    acc = [row["accuracy"] for row in curve]
    first = curve[0]["first"]
    assert all(abs(a - first) < 0.08 for a in acc), (first, acc)
    assert curve[-1]["oracle"] > 0.9  # the samples had right answers to find


def test_majority_rises_when_the_right_answer_is_the_plurality():
    prompts, completions, references = planted(p_correct=0.45)
    curve = best_of_n_curve(prompts, completions, references, NS, get_verifier("majority", backend="normalizer"))
    acc = [row["accuracy"] for row in curve]
    assert acc[NS.index(8)] > acc[0] + 0.2, acc


def test_without_references_the_true_score_is_reported():
    from pyvf.data import openended

    good = " Once, Ada had 3 marbles. Then the marbles rolled away. In the end, Ada found them."
    bad = " Look at the marbles. Never lose them."
    prompts = ["Task: a story"]

    class Longer:  # prefers the longer story: the good one, from N = 2 on
        name = "longer"

        def __call__(self, prompts, completions, references=None):
            assert references is None
            return [float(len(c)) for c in completions]

    curve = best_of_n_curve(prompts, [[bad, good]], None, [1, 2], Longer())
    assert curve[0]["accuracy"] == pytest.approx(openended.true_score(bad))
    assert curve[1]["accuracy"] == pytest.approx(openended.true_score(good)) == curve[1]["oracle"]


def test_pick_best_ties_and_nan():
    assert pick_best([0.2, 0.9, 0.9]) == 1
    assert pick_best([float("nan"), 0.1, 0.1]) == 1
    assert pick_best([float("nan")] * 3) == 0
    assert pick_best([-1.0, -2.0]) == 0


def test_bad_input():
    assert parse_ns("1,2,4") == [1, 2, 4]
    for text in ("", "0,1", "4,2", "1,x"):
        with pytest.raises(ValueError, match="--n"):
            parse_ns(text)
    prompts, completions, references = planted(n_questions=2, n_samples=4)
    with pytest.raises(ValueError, match=r"completions\[0\] holds 4 samples, fewer than max\(ns\)=8"):
        best_of_n_curve(prompts, completions, references, [1, 8], get_verifier("rule", backend="normalizer"))

    class Short:
        name = "short"

        def __call__(self, prompts, completions, references=None):
            return [0.0]

    with pytest.raises(ValueError, match="returned 1 scores for 4 completions"):
        best_of_n_curve(prompts, completions, references, [2], Short())


def test_bon_command_on_the_shipped_model(tmp_path):
    from pyvf.cli import main

    out = tmp_path / "bon"
    assert main(["bon", "--limit", "3", "--n", "1,2,4", "--max-new-tokens", "40", "--output-dir", str(out)]) == 0
    result = json.loads((out / "bon.json").read_text())
    assert [row["n"] for row in result["curve"]] == [1, 2, 4]
    assert result["questions"] == 3 and result["verifier"] == "majority" and result["has_references"]
    for row in result["curve"]:
        assert 0 <= row["accuracy"] <= row["oracle"] <= 1
    assert (out / "bon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["bon", "--n", "4,2", "--output-dir", str(out)]) == 2
    assert main(["bon", "--verifier", "nonsense", "--limit", "1", "--output-dir", str(out)]) == 2
