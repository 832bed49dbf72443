"""Each reward formula against a hand-computed example from its definition (DESIGN.md
1.3 to 1.7), plus the edge cases: no valid completion in a group, all rewards equal,
one valid completion."""

import math

import pytest
import torch

from pyvf.rewards import (
    RewardStdFilter, nover_perplexity, nover_rewards, pcl_consistency, rlpr_rewards, rlpr_score, verifier_rewards,
)


def test_verifier_rewards():
    completions = ["... so 8/5. <answer> \\boxed{1.6} </answer>", "\\boxed{2} then \\boxed{ 13 }", "no box", "\\boxed{7}"]
    refs = [["8/5"], ["13"], ["1"], ["8"]]
    assert verifier_rewards(completions, refs).tolist() == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="same length"):
        verifier_rewards(["x"], [])


def test_rlpr_score_and_reward_by_hand():
    # Two packed sequences; span tokens have log-probs log 0.5, log 0.25 (seq 0) and log 0.8 (seq 1).
    logprobs = torch.log(torch.tensor([0.9, 0.5, 0.25, 0.3, 0.8, 0.1]))
    span = torch.tensor([False, True, True, False, True, False])
    cu = torch.tensor([0, 4, 6])
    score = rlpr_score(logprobs, span, cu)
    assert score.tolist() == pytest.approx([0.375, 0.8])
    without = torch.tensor([0.5, 0.3])
    reward = rlpr_rewards(score, without, torch.tensor([1.0, 0.0]))
    # 0.9 * max(0, 0.375 - 0.5) + 0.1 * 1 = 0.1 ; 0.9 * (0.8 - 0.3) + 0 = 0.45
    assert reward.tolist() == pytest.approx([0.1, 0.45])


def test_rlpr_score_without_span_is_zero():
    assert rlpr_score(torch.zeros(3), torch.zeros(3, dtype=torch.bool), torch.tensor([0, 3])).tolist() == [0.0]


def test_reward_std_filter():
    f = RewardStdFilter(ratio=0.5, decay=0.99)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.5, 0.4, 0.6])   # stds: 0.7071, 0, 0.1414
    keep = f(rewards, groups)
    ema = (math.sqrt(0.5) + 0 + math.sqrt(0.02)) / 3
    assert f.ema == pytest.approx(ema)
    # kept: std >= 0.5 * ema = 0.1414 -> groups 0 and 2 (equal rewards never pass)
    assert keep.tolist() == [True, True, False, False, True, True]
    state = f.state_dict()
    g = RewardStdFilter()
    g.load_state_dict(state)
    keep2 = g(torch.tensor([0.0, 0.1]), torch.tensor([5, 5]))
    assert g.ema == pytest.approx(0.99 * ema + 0.01 * math.sqrt(0.005))
    assert keep2.tolist() == [False, False]


def test_nover_perplexity():
    nll, length = torch.tensor([2.0, 2.0, 1.0]), torch.tensor([1, 100, 0])
    # N(1) = 1, N(100) = 3, N(0) -> clamp |z| to 1 -> 1
    assert nover_perplexity(nll, length).tolist() == pytest.approx([math.exp(2.0), math.exp(2.0 / 3), math.e])


def test_nover_rewards_by_hand():
    # One group of 4: three valid with perplexities 2, 1, 3 and lengths 10, 20, 5; one invalid.
    p = torch.tensor([2.0, 1.0, 3.0, 0.5])
    length = torch.tensor([10, 20, 5, 1])
    valid = torch.tensor([True, True, True, False])
    r = nover_rewards(p, length, valid, torch.zeros(4, dtype=torch.long))
    # ranks 1, 0, 2 -> R_r = 2/3, 1, 1/3; efficiency: i=0 (10, 2): j=2? 10<5 no; j=1 (20, 1): P 2<1 no -> 0;
    # i=1 (20, 1): none longer -> 0; i=2 (5, 3): shorter than both but P 3 not < 2 or 1 -> 0
    assert r.tolist() == pytest.approx([1 + 2 / 3, 2.0, 1 + 1 / 3, 0.0])
    # efficiency credit: shorter and lower perplexity than one of two others
    r = nover_rewards(torch.tensor([1.0, 2.0, 0.5]), torch.tensor([5, 10, 20]), torch.ones(3, dtype=torch.bool),
                      torch.zeros(3, dtype=torch.long))
    # i=0: ranks 1 -> 2/3; beats j=1 (5<10, 1<2) -> 1/2 ; i=1: rank 2 -> 1/3, 0 ; i=2: rank 0 -> 1, 0
    assert r.tolist() == pytest.approx([1 + 2 / 3 + 1 / 2, 1 + 1 / 3, 2.0])


def test_nover_edge_cases():
    groups = torch.tensor([0, 0, 1, 1])
    none_valid = nover_rewards(torch.tensor([1.0, 2.0, 1.0, 1.0]), torch.tensor([3, 4, 3, 3]),
                               torch.tensor([False, False, True, True]), groups)
    assert none_valid[:2].tolist() == [0.0, 0.0]
    assert none_valid[2:].tolist() == pytest.approx([2.0, 2.0])  # equal perplexities share rank 0
    one_valid = nover_rewards(torch.tensor([4.0, 1.0]), torch.tensor([3, 4]), torch.tensor([True, False]),
                              torch.tensor([0, 0]))
    assert one_valid.tolist() == [2.0, 0.0]  # format + rank reward 1, no efficiency term
    weighted = nover_rewards(torch.tensor([4.0]), torch.tensor([3]), torch.tensor([True]), torch.tensor([0]),
                             weights=(0.5, 2.0, 1.0))
    assert weighted.tolist() == [2.5]


def test_pcl_consistency():
    gt = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.6, 1.0]])
    pred = torch.tensor([[1.0, 1.0], [0.5, 1.0], [0.0, 0.0], [0.3, 0.5]])
    # row 1: |0-0.5|/0.5 = 1, 0 -> 1 - 0.5 ; row 2: 0/0 counts as a match ; row 3: (0.5 + 0.5) / 2
    assert pcl_consistency(gt, pred).tolist() == pytest.approx([1.0, 0.5, 1.0, 0.5])
