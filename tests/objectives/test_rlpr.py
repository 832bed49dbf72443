"""RLPR: each formula against hand-computed examples and the behaviour of the official
code it was checked with (each test's docstring names the file and function;
docs/algorithms.md has the formulas and the deliberate differences)."""

import math

import pytest
import torch

from pyvf.objectives.base import group_stds
from pyvf.objectives.rlpr import (
    RewardStdFilter, apply_repetition_penalty, count_markers, repetition_penalty, rlpr_format_ok, rlpr_rewards,
    rlpr_score, rlpr_scoreable,
)


def test_rlpr_score_by_hand():
    """OpenBMB/RLPR verl/workers/reward_manager/prob.py, ProbRewardManager.compute_scoreB with
    compute_score_name=mean_exp_log_softmax: mean of exp(log-prob) over the ground-truth mask."""
    # Two packed sequences; span tokens have log-probs log 0.5, log 0.25 (seq 0) and log 0.8 (seq 1).
    logprobs = torch.log(torch.tensor([0.9, 0.5, 0.25, 0.3, 0.8, 0.1]))
    span = torch.tensor([False, True, True, False, True, False])
    score = rlpr_score(logprobs, span, torch.tensor([0, 4, 6]))
    assert score.tolist() == pytest.approx([0.375, 0.8])
    # A sequence without span tokens scores 0 (compute_scoreB: ground_truth_mask.sum() == 0 -> 0).
    assert rlpr_score(torch.zeros(3), torch.zeros(3, dtype=torch.bool), torch.tensor([0, 3])).tolist() == [0.0]
    with pytest.raises(ValueError, match="span_mask"):
        rlpr_score(logprobs, span.float(), torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="span_mask"):
        rlpr_score(logprobs, span[:3], torch.tensor([0, 6]))


def test_rlpr_rewards_formula():
    """OpenBMB/RLPR verl/workers/reward_manager/prob.py, ProbRewardManager.__call__ with
    shaping_function_name=threshold_0 and format_coefficient=0.1 (examples/RLPR/reproduce_qwen.sh):
    score = 0.9 * max(0, B - A) + 0.1 * format; an unspliceable completion has B = 0."""
    b = torch.tensor([0.375, 0.8, 0.9])
    a = torch.tensor([0.5, 0.3, 0.2])
    fmt = torch.tensor([1.0, 0.0, 1.0])
    # 0.9 * max(0, -0.125) + 0.1 = 0.1 ; 0.9 * 0.5 + 0 = 0.45 ; 0.9 * 0.7 + 0.1 = 0.73
    assert rlpr_rewards(b, a, fmt).tolist() == pytest.approx([0.1, 0.45, 0.73])
    scoreable = torch.tensor([True, True, False])
    assert rlpr_rewards(b, a, fmt, scoreable=scoreable).tolist() == pytest.approx([0.1, 0.45, 0.1])
    with pytest.raises(ValueError, match="format_ok"):
        rlpr_rewards(b, a, fmt[:2])


def test_rlpr_markers_and_format():
    """OpenBMB/RLPR verl/trainer/ppo/ray_trainer.py, RayPPOTrainer.replace_answer_with_gt_batch (valid_flag:
    exactly one <answer>, one <think>, one </think>, in order, non-blank answer section) and
    verl/workers/reward_manager/prob.py, format_reward (format_mode R1 and R1_nothink)."""
    good = "<think>reason</think> <answer> 42 </answer>"
    assert count_markers(good) == 1 and rlpr_scoreable(good) and rlpr_format_ok(good)
    two = "<think>r</think><answer>1</answer><answer>2</answer>"
    assert count_markers(two) == 2 and not rlpr_scoreable(two) and not rlpr_format_ok(two)
    truncated = "<think>reason</think><answer> 4"     # no </answer>: still scoreable, format 0
    assert rlpr_scoreable(truncated) and not rlpr_format_ok(truncated)
    assert not rlpr_scoreable("<think>r</think><answer>   \n")           # blank answer section
    assert not rlpr_scoreable("<answer>1</answer><think>r</think>")     # order
    assert not rlpr_scoreable("<think>a</think><think>b</think><answer>1")
    assert rlpr_scoreable("<answer>7", think=False) and rlpr_format_ok("x <answer>7</answer>", think=False)
    assert rlpr_format_ok("<think>r</think><answer>1</answer>")
    with pytest.raises(ValueError, match="marker"):
        count_markers("x", "")


def test_repetition_penalty_windows():
    """OpenBMB/RLPR verl/utils/reward_score/repetition.py, detect_repetition_with_hash(window_size=10,
    max_repetitions_limit=10) as ray_trainer.py calls it: -1 once a 10-word window has occurred 10 times;
    words are whitespace pieces split again on '_'; at most 10 words is never penalized."""
    ten = "a b c d e f g h i j "
    assert repetition_penalty(ten * 10) == -1.0     # window 'a..j' at word 0, 10, ..., 90: 10 times
    assert repetition_penalty(ten * 9) == 0.0       # at most 9 occurrences of any window
    assert repetition_penalty("x " * 19) == -1.0        # 19 words: 10 identical (overlapping) windows
    assert repetition_penalty("x " * 18 + "y") == 0.0   # the 10th window holds the y
    assert repetition_penalty("x " * 10) == 0.0         # 10 words: never penalized
    # '_' splits words: 10 repeats of 5 pieces = 100 words of period 10 -> penalized; read as
    # whitespace pieces only it would be 50 words of period 5 (window occurs 9 times) -> not.
    assert repetition_penalty("a_b c_d e_f g_h i_j " * 10) == -1.0
    assert repetition_penalty("ab cd ef gh ij " * 10) == 0.0
    assert repetition_penalty(ten * 4, window=10, limit=4) == -1.0
    with pytest.raises(ValueError, match="window"):
        repetition_penalty("x", window=0)


def test_repetition_penalty_only_on_nonzero_rewards():
    """OpenBMB/RLPR verl/trainer/ppo/ray_trainer.py, RayPPOTrainer.fit: reward_tensor[i][nonzero] += penalty,
    both in the filter phase and for the training reward."""
    rewards = torch.tensor([0.0, 0.1, 0.73, 0.0])
    pen = torch.tensor([-1.0, -1.0, 0.0, 0.0])
    assert apply_repetition_penalty(rewards, pen).tolist() == pytest.approx([0.0, -0.9, 0.73, 0.0])


def test_group_stds_unbiased_nan_and_singletons():
    """OpenBMB/RLPR verl/trainer/ppo/core_algos.py, compute_grpo_outcome_advantage: torch.std (unbiased)."""
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.5, 0.4, float("nan"), 3.0])
    groups = torch.tensor([7, 7, 2, 2, 5, 5, 9])
    ids, stds = group_stds(rewards, groups)
    assert ids.tolist() == [2, 5, 7, 9]
    assert stds[0] == 0 and math.isnan(stds[1]) and stds[2] == pytest.approx(math.sqrt(0.5)) and math.isnan(stds[3])


def _run_steps(f, per_step_rounds):
    masks = []
    for step, rounds in per_step_rounds:
        f.begin_step(step)
        masks.append([f.keep(torch.tensor(r, dtype=torch.float64)).tolist() for r in rounds])
    return masks


def test_reward_std_filter_official_schedule():
    """OpenBMB/RLPR verl/trainer/ppo/ray_trainer.py, RayPPOTrainer.fit with filter_mode=EMA,
    filter_ema_start_step=6, filter_start_step=11, filter_ema_ratio=0.99, std_filter_beta=0.5,
    filter_target=final_reward_std (examples/RLPR/reproduce_qwen.sh): no filter in steps 1-10; the EMA
    starts at step 11 as the mean of steps 6-10's mean std; then EMA <- 0.99 EMA + 0.01 * mean std of
    every group sampled in the previous step (all refill rounds, kept or not, NaN/inf left out)."""
    f = RewardStdFilter()
    early = [(s, [[9.0, 0.0, float("nan")]]) for s in range(1, 6)]          # not recorded
    warm = [(s, [[0.1 * s, 0.1 * s + 0.2]]) for s in range(6, 11)]           # step means 0.1 s + 0.1
    masks = _run_steps(f, early + warm)
    assert all(all(m) for rounds in masks for m in rounds)                   # nothing filtered
    assert f.threshold is None and f.ema is None

    f.begin_step(11)
    ema11 = sum(0.1 * s + 0.1 for s in range(6, 11)) / 5                     # 0.9
    assert f.ema == pytest.approx(ema11) and f.threshold == pytest.approx(0.45)
    r1 = f.keep(torch.tensor([0.5, 0.2, float("nan"), 0.46]))
    r2 = f.keep(torch.tensor([0.44, 1.2, float("inf")]))                     # a refill round, same step
    assert r1.tolist() == [True, False, False, True] and r2.tolist() == [False, True, False]
    state = f.state_dict()

    f.begin_step(12)
    m11 = (0.5 + 0.2 + 0.46 + 0.44 + 1.2) / 5                                # all finite stds of step 11
    assert f.ema == pytest.approx(0.99 * ema11 + 0.01 * m11)

    resumed = RewardStdFilter(beta=0.1)
    resumed.load_state_dict(state)
    resumed.begin_step(12)
    assert resumed.ema == f.ema and resumed.threshold == f.threshold
    rounds13 = [(13, [[0.3, 0.9]]), (14, [[float("nan")]]), (15, [[0.6]])]
    assert _run_steps(f, rounds13) == _run_steps(resumed, rounds13)
    assert f.state_dict() == resumed.state_dict()
    # Step 13 recorded no finite std: step 14 keeps step 13's EMA.
    g = RewardStdFilter()
    g.load_state_dict(state)
    _run_steps(g, [(12, [[0.3, 0.9]]), (13, [[float("nan")]])])
    ema13 = g.ema
    g.begin_step(14)
    assert g.ema == ema13


def test_reward_std_filter_errors_and_completion_mask():
    """Convenience call: members of kept groups (same rule as RewardStdFilter.keep)."""
    f = RewardStdFilter(ema_start_step=1, filter_start_step=2)
    with pytest.raises(ValueError, match="begin_step"):
        f.keep(torch.tensor([1.0]))
    f.begin_step(1)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    assert f(torch.tensor([0.0, 1.0, 0.5, 0.5, 0.4, 0.6]), groups).all()   # step 1: no filtering
    f.begin_step(2)                                                         # EMA = (0.7071 + 0 + 0.1414) / 3
    keep = f(torch.tensor([0.0, 1.0, 0.5, 0.5, 0.4, 0.6]), groups)
    assert keep.tolist() == [True, True, False, False, True, True]
    with pytest.raises(ValueError, match="step must increase"):
        f.begin_step(2)
    with pytest.raises(ValueError, match="stds"):
        f.keep(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="ema_start_step"):
        RewardStdFilter(ema_start_step=12, filter_start_step=11)


# --- the objective in the trainer ------------------------------------------------------------

from helpers import config, context, grads, make_samples, tiny_policy  # noqa: E402

from pyvf.objectives.rlpr import RLPR  # noqa: E402
from pyvf.packing import ROLE_REASONING, pack  # noqa: E402
from pyvf.train.trainer import accumulate_gradients  # noqa: E402


def test_rewards_format_and_probability_gain():
    """Invalid completions (no marker) score 0; valid ones 0.1 (format) + 0.9 max(0, B - A),
    B from the spliced reference span under the policy, A cached from setup."""
    policy, tok = tiny_policy()
    obj = RLPR(config(), tok)
    samples = make_samples(tok, n_groups=1)
    obj.score_a = torch.zeros(1, 2, dtype=torch.float64)
    r = obj.score(samples, context(policy))
    assert r[2] == 0.0
    assert torch.all(r[[0, 1, 3]] >= 0.1) and torch.all(r[[0, 1, 3]] <= 1.0)
    assert r[0] > r[1]  # the right reasoning makes the reference more likely than the skipped step
    # A at least B everywhere: only the format score is left.
    obj.score_a = torch.ones(1, 2, dtype=torch.float64)
    assert obj.score(samples, context(policy)).tolist() == pytest.approx([0.1, 0.1, 0.0, 0.1])


def test_score_a_from_the_initial_policy_once():
    from pyvf.train.trainer import Prompts

    policy, tok = tiny_policy()
    cfg = config()
    from pyvf.data.dataset import synthetic_examples

    examples = synthetic_examples(6, seed=3)
    obj = RLPR(cfg, tok)
    obj.setup(policy, examples, Prompts(cfg, tok, examples), torch.device("cpu"))
    assert obj.score_a.shape == (6, max(len(e.answers) for e in examples))
    for i, ex in enumerate(examples):
        assert torch.all(obj.score_a[i, :len(ex.answers)] > 0) and torch.all(obj.score_a[i, len(ex.answers):] == 0)
    state = obj.state_dict()
    other = RLPR(cfg, tok)
    other.load_state_dict(state)
    assert torch.equal(other.score_a, obj.score_a)


@pytest.mark.parametrize("lm_head_pass", ["fused", "autograd"])
def test_gradient_is_the_clipped_surrogate_with_entropy_bonus(lm_head_pass):
    """accumulate_gradients with the objective's coefficients equals autograd through
    verl's loss written out: token-mean of -min(r A, clip(r, 0.8, 1.27) A) - 0.001 entropy
    (OpenBMB/RLPR verl/trainer/ppo/core_algos.py compute_policy_loss, dp_actor.py)."""
    policy, tok = tiny_policy(lm_head_pass)
    cfg = config()
    obj = RLPR(cfg, tok)
    samples = make_samples(tok, n_groups=2)
    # Plant rollout log-probs so that ratios land on both sides of the clip range.
    ts = obj.sequences(samples)
    with torch.no_grad():
        current = policy(pack(ts.sequences))
    batch = pack(ts.sequences)
    rows = (batch.roles == ROLE_REASONING).nonzero().squeeze(1)
    offsets = torch.tensor([-0.5, 0.0, 0.4, 0.1])
    k = 0
    for s in samples:
        n = len(s.ids)
        s.rollout_logprobs = (current[rows[k:k + n]].double() + offsets[torch.arange(n) % 4]).tolist()
        k += n
    rewards = torch.tensor([1.0, 0.2, 0.0, 0.7, 0.0, 0.9, 0.3, 0.3], dtype=torch.float64)
    ctx = context(policy)
    accumulate_gradients(cfg, obj, "token_mean", policy, samples, rewards, ctx)
    got = grads(policy)

    policy.zero_grad(set_to_none=True)
    logp, entropy = policy(batch, with_entropy=True)
    from pyvf.ops import grouped_advantages

    adv = grouped_advantages(rewards.float(), torch.tensor([s.group for s in samples]), estimator="grpo").double()
    seg = torch.repeat_interleave(torch.arange(len(samples)), batch.cu_seqlens.diff())
    old = torch.zeros_like(logp, dtype=torch.float64)
    old[rows] = torch.tensor([v for s in samples for v in s.rollout_logprobs], dtype=torch.float64)
    ratio = torch.exp(logp.double() - old)
    a = adv[seg]
    surrogate = torch.minimum(ratio * a, torch.clamp(ratio, 0.8, 1.27) * a)
    mask = batch.roles == ROLE_REASONING
    loss = (-(surrogate * mask).sum() - 0.001 * (entropy.double() * mask).sum()) / mask.sum()
    loss.backward()
    want = grads(policy)
    assert torch.linalg.norm(got - want) / torch.linalg.norm(want) < 1e-5
    clip = ctx.metrics["clip_frac"]
    assert 0 < clip[0] < clip[1]  # some rows clipped, not all
