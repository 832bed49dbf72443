"""R-Zero: each formula against hand-computed cases and the official code it follows
(Chengsong-Huang/R-Zero; each test's docstring names the file), the challenger's
rewards, and self-play resuming exactly."""

import math

import pytest
import torch

from pyvf.objectives.rzero import (
    average_linkage_clusters, bleu_distances, challenger_rewards, extract_question, in_band, pseudo_label,
    repetition_penalties, uncertainty_reward,
)


def test_extract_question():
    """examples/reward_function/caller_penalty.py compute_score: the last <question>(.*?)</question>, DOTALL, stripped."""
    assert extract_question("<question> What is 2 + 2? </question>") == "What is 2 + 2?"
    assert extract_question("<question>a</question> x <question>\nb\n</question>") == "b"
    for bad in ["no tags", "<question>   </question>", "<question> open only", ""]:
        assert extract_question(bad) is None, bad


def test_pseudo_label_equivalence_ties_and_missing_answers():
    """vllm_service_init/start_vllm_server.py process_single: each answer joins the first
    cluster whose first answer it matches (grade_answer either way), the largest cluster
    wins, ties to the first formed (max over an insertion-ordered dict), p_hat = count / m,
    a missing box counts as the answer "None"."""
    assert pseudo_label(["8/5", "1.6", "2", "\\frac{8}{5}"]) == ("8/5", 0.75)
    assert pseudo_label(["2", "3", "3", "2"]) == ("2", 0.5)              # tie: the first formed
    assert pseudo_label(["3", "2", "2", "3"]) == ("3", 0.5)
    assert pseudo_label(["1", "2", "3", "4", "5"]) == ("1", 0.2)
    assert pseudo_label([None, None, "4"]) == (None, pytest.approx(2 / 3))  # missing answers win: no label
    assert pseudo_label([None, "4", "4"]) == ("4", pytest.approx(2 / 3))
    with pytest.raises(ValueError, match="answers"):
        pseudo_label([])


def test_uncertainty_and_band():
    """caller_penalty.py: min(p, 1 - p) (the paper's 1 - 2|p - 1/2| halved); upload.py:
    0.3 <= p <= 0.8, both ends kept, and a label."""
    assert [uncertainty_reward(p) for p in (0.0, 0.2, 0.5, 0.9, 1.0)] == pytest.approx([0, 0.2, 0.5, 0.1, 0])
    with pytest.raises(ValueError, match="p_hat"):
        uncertainty_reward(1.5)
    assert in_band(0.3, "4") and in_band(0.8, "4") and in_band(0.5, "x")
    assert not in_band(0.29, "4") and not in_band(0.81, "4") and not in_band(0.5, None)


def test_bleu_distances_by_hand():
    """caller_penalty.py _bleu_distance_matrix: 1 - sentence BLEU (4-gram, method1
    smoothing eps 0.1, whitespace tokens), q_i the hypothesis for i < j, mirrored."""
    d = bleu_distances(["a b c d", "a b c d", "e f a g", "h i j k"])
    assert d.shape == (4, 4) and torch.equal(d, d.T) and torch.all(d.diagonal() == 0)
    assert d[0, 1] == pytest.approx(0.0, abs=1e-12)
    # one unigram match out of 4, no longer n-gram: precisions 1/4, 0.1/3, 0.1/2, 0.1/1, brevity 1
    bleu = math.exp((math.log(1 / 4) + math.log(0.1 / 3) + math.log(0.1 / 2) + math.log(0.1)) / 4)
    assert d[0, 2] == pytest.approx(1 - bleu, rel=1e-9)
    assert d[0, 3] == 1.0                                                 # no unigram match: BLEU 0
    # 4 of 5 unigrams, 3/4, 2/3, 1/2 of the longer n-grams
    one_off = bleu_distances(["a b c d e", "a b c d f"])[0, 1]
    assert one_off == pytest.approx(1 - (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, rel=1e-9)


def test_average_linkage_is_not_single_linkage():
    """sklearn AgglomerativeClustering(distance_threshold=0.5, linkage="average"): merge
    while the mean distance between two clusters is below the threshold. Items 0-1 are
    close (0.1), 2 is close to 1 (0.4) but far from 0 (0.9): average 0.65 keeps it out,
    where single linkage (0.4) would merge it."""
    d = torch.tensor([[0.0, 0.1, 0.9, 1.0],
                      [0.1, 0.0, 0.4, 1.0],
                      [0.9, 0.4, 0.0, 1.0],
                      [1.0, 1.0, 1.0, 0.0]])
    assert average_linkage_clusters(d) == [0, 0, 1, 2]
    assert average_linkage_clusters(d, threshold=0.7) == [0, 0, 0, 1]
    assert average_linkage_clusters(torch.zeros(0, 0)) == []
    with pytest.raises(ValueError, match="square"):
        average_linkage_clusters(torch.zeros(2, 3))


def test_repetition_penalty_on_planted_near_duplicates():
    """penalty_i = |cluster(i)| / n over the batch (caller_penalty.py cluster_share_per_problem)."""
    base = "Ada has 12 apples and buys 5 more , then shares them equally among 4 friends ."
    questions = [base, base.replace("12", "13"), base.replace("Ada", "Ben"),
                 "A jug holds 3 liters of tea and 10 more liters are added .",
                 "Goro walks 4 km every hour for 3 hours and the path has 6 equal parts ."]
    assert repetition_penalties(questions).tolist() == pytest.approx([3 / 5, 3 / 5, 3 / 5, 1 / 5, 1 / 5])
    assert repetition_penalties([]).numel() == 0


def test_challenger_rewards():
    """caller_penalty.py: (min(p, 1 - p) if a question else -1) - penalty, no clipping;
    malformed outputs are clustered as empty text."""
    qs = ["Ada has 12 apples and buys 5 more .", None, "A jug holds 3 liters of tea and 10 more are added .", None]
    r = challenger_rewards(qs, [0.5, 0.0, 0.9, 0.0])
    # BLEU of empty texts is 0 (distance 1), so malformed outputs do not cluster with each other
    pen = repetition_penalties(["Ada has 12 apples and buys 5 more .", "",
                                "A jug holds 3 liters of tea and 10 more are added .", ""]).tolist()
    assert r.tolist() == pytest.approx([0.5 - pen[0], -1 - pen[1], 0.1 - pen[2], -1 - pen[3]])
    assert pen == [0.25] * 4
    with pytest.raises(ValueError, match="same length"):
        challenger_rewards(["a"], [0.1, 0.2])


class StubSolver:
    """Votes from a table; records what it was asked."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def vote(self, questions, seeds, m):
        self.calls.append((list(questions), list(seeds), m))
        return [self.table[q] for q in questions]


def test_challenger_scores_questions_with_the_solver_vote():
    from helpers import config, context, tiny_policy

    from pyvf.data.dataset import Example
    from pyvf.objectives.base import Sample
    from pyvf.objectives.rzero import RZeroChallenger

    _, tok = tiny_policy()
    obj = RZeroChallenger(config(objective="rzero", solver_samples=6), tok)
    texts = [" <question> Ada has 12 apples and buys 5 more . How many ? </question>",
             " no tags at all",
             " <question> A jug holds 3 liters of tea and 10 more are added . How much ? </question>",
             " <question> Ada has 12 apples and buys 5 more . How many ? </question>"]
    ex = Example("unused", ("1",), (1.0,))
    samples = [Sample(0, ex, [1, 2], tok(t, add_special_tokens=False)["input_ids"], "eos", None, group=k // 2)
               for k, t in enumerate(texts)]
    q_ada = "Ada has 12 apples and buys 5 more . How many ?"
    q_jug = "A jug holds 3 liters of tea and 10 more are added . How much ?"
    obj.solver = StubSolver({q_ada: ("17", 0.5), q_jug: ("13", 1.0)})
    ctx = context(None, step=4)
    r = obj.score(samples, ctx)
    (questions, seeds, m), = obj.solver.calls
    assert questions == [q_ada, q_jug, q_ada] and m == 6
    assert seeds[0] != seeds[2]  # same question, other sample: its own answers
    want = challenger_rewards([q_ada, None, q_jug, q_ada], [0.5, 0.0, 1.0, 0.5])
    assert torch.equal(r, want)
    assert r[0] == pytest.approx(0.5 - 2 / 4) and r[2] == pytest.approx(0.0 - 1 / 4)
    assert ctx.metrics["rzero_valid_frac"][:2] == (3, 4)
    assert ctx.metrics["rzero_in_band_frac"][:2] == (2, 4)
