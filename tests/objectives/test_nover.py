"""NOVER: each formula against hand-computed examples and the behaviour of the official
code it was checked with (each test's docstring names the file and function;
docs/algorithms.md has the formulas and the deliberate differences)."""

import math

import pytest
import torch

from pyvf.objectives.nover import k3_kl, k3_kl_grad, nover_answer_block, nover_perplexity, nover_rewards


def test_nover_answer_block_text():
    """thinkwee/NOVER utils.py, calculate_perplexity (use_tagged_format): target = "\\n<answer>\\n{ref}\\n</answer>"."""
    assert nover_answer_block("Paris") == "\n<answer>\nParis\n</answer>"
    assert nover_answer_block("x", tag="final") == "\n<final>\nx\n</final>"


def test_nover_perplexity():
    """thinkwee/NOVER utils.py, calculate_perplexity: exp(nll / max(1, 1 + log10(reasoning_len)))."""
    nll, length = torch.tensor([2.0, 2.0, 1.0, 3.0]), torch.tensor([1, 100, 0, 5])
    # N(1) = 1, N(100) = 3, N(0) = max(1, -inf) = 1, N(5) = 1 + log10 5
    expected = [math.exp(2.0), math.exp(2.0 / 3), math.e, math.exp(3.0 / (1 + math.log10(5)))]
    assert nover_perplexity(nll, length).tolist() == pytest.approx(expected)


def test_nover_rewards_by_hand():
    """thinkwee/NOVER reward_functions.py, reasoning_reward ((n - rank) / n, sorted() ascending) and
    efficiency_reward (strict < on length and perplexity, / (n - 1), 0 when n < 2); TRL sums the three
    rewards with reward_weights [1, 1, 1] (config.py REWARD_WEIGHTS)."""
    # One group of 4: three valid with perplexities 2, 1, 3 and lengths 10, 20, 5; one invalid.
    p = torch.tensor([2.0, 1.0, 3.0, 0.5])
    length = torch.tensor([10, 20, 5, 1])
    valid = torch.tensor([True, True, True, False])
    r = nover_rewards(p, length, valid, torch.zeros(4, dtype=torch.long))
    # ranks 1, 0, 2 -> R_r = 2/3, 1, 1/3; no completion is both shorter and lower in perplexity
    assert r.tolist() == pytest.approx([1 + 2 / 3, 2.0, 1 + 1 / 3, 0.0])
    r = nover_rewards(torch.tensor([1.0, 2.0, 0.5]), torch.tensor([5, 10, 20]), torch.ones(3, dtype=torch.bool),
                      torch.zeros(3, dtype=torch.long))
    # i=0: rank 1 -> 2/3, beats j=1 (5<10, 1<2) -> 1/2 ; i=1: rank 2 -> 1/3 ; i=2: rank 0 -> 1
    assert r.tolist() == pytest.approx([1 + 2 / 3 + 1 / 2, 1 + 1 / 3, 2.0])


def test_nover_ties_by_order_and_edge_cases():
    """thinkwee/NOVER reward_functions.py, reasoning_reward: Python's stable sort ranks equal perplexities
    by completion order; efficiency_reward returns 0 for all when fewer than two are valid."""
    groups = torch.tensor([0, 0, 1, 1, 1])
    r = nover_rewards(torch.tensor([1.0, 2.0, 1.5, 1.5, 1.5]), torch.tensor([3, 4, 3, 3, 3]),
                      torch.tensor([False, False, True, True, True]), groups)
    assert r[:2].tolist() == [0.0, 0.0]
    assert r[2:].tolist() == pytest.approx([2.0, 1 + 2 / 3, 1 + 1 / 3])   # ties: 1, 2/3, 1/3 by order
    one_valid = nover_rewards(torch.tensor([4.0, 1.0]), torch.tensor([1, 40]), torch.tensor([True, False]),
                              torch.tensor([0, 0]))
    assert one_valid.tolist() == [2.0, 0.0]
    weighted = nover_rewards(torch.tensor([4.0]), torch.tensor([3]), torch.tensor([True]), torch.tensor([0]),
                             weights=(0.5, 2.0, 1.0))
    assert weighted.tolist() == [2.5]
    # equal lengths or equal perplexities never count as "better" (strict comparisons)
    eq = nover_rewards(torch.tensor([1.0, 2.0, 1.0]), torch.tensor([5, 5, 9]), torch.ones(3, dtype=torch.bool),
                       torch.zeros(3, dtype=torch.long))
    assert eq.tolist() == pytest.approx([2.0, 1 + 1 / 3, 1 + 2 / 3])


def test_k3_kl_value_and_gradient():
    """huggingface/trl v0.16.0 trl/trainer/grpo_trainer.py, GRPOTrainer.compute_loss (copied by thinkwee/NOVER
    trainer.py, CustomGRPOTrainer.compute_loss): per_token_kl = exp(ref - logp) - (ref - logp) - 1."""
    torch.manual_seed(0)
    logp = (torch.randn(7, dtype=torch.float64) - 2).requires_grad_()
    ref = torch.randn(7, dtype=torch.float64) - 2
    kl = k3_kl(logp, ref)
    d = ref - logp.detach()
    assert torch.allclose(kl.detach(), torch.exp(d) - d - 1)
    assert (kl.detach() >= 0).all() and k3_kl(ref, ref).abs().max() == 0
    kl.sum().backward()
    assert torch.allclose(logp.grad, k3_kl_grad(logp, ref))


# --- the objective in the trainer ------------------------------------------------------------

from helpers import config, context, grads, make_samples, tiny_policy  # noqa: E402

from pyvf.objectives.nover import NOVER, nover_valid  # noqa: E402
from pyvf.packing import ROLE_REASONING, pack  # noqa: E402
from pyvf.train.trainer import accumulate_gradients  # noqa: E402


def test_format_check():
    assert nover_valid(" 1 + 1 = 2. <answer> \\boxed{2} </answer>")
    assert not nover_valid(" 1 + 1 = 2. <answer> \\boxed{2} </answer> more")
    assert not nover_valid(" <answer> 1 </answer> <answer> 2 </answer>")
    assert nover_valid("<think> a </think>\n<answer> 2 </answer>", think=True)
    assert not nover_valid("a <answer> 2 </answer>", think=True)


def test_rewards_rank_valid_completions_only():
    policy, tok = tiny_policy()
    obj = NOVER(config(), tok)
    obj.attach(policy)
    # One reference: with several, the perplexity averages over them, and after "= 4/5."
    # the other form (0.8) is unlikely whatever came before.
    samples = make_samples(tok, n_groups=1, answers=("4/5",))
    r = obj.score(samples, context(policy))
    assert r[2] == 0.0  # truncated, no answer
    # Three valid: format 1 each, rank rewards 1, 2/3, 1/3 by perplexity, efficiency at most 1.
    valid = r[[0, 1, 3]]
    assert torch.all(valid >= 1 + 1 / 3 - 1e-12) and torch.all(valid <= 3 + 1e-12)
    # The right reasoning has the lowest perplexity (rank reward 1) and is the longest
    # (efficiency 0); the skipped step is shorter, so efficiency may lift its total.
    assert r[0] == pytest.approx(2.0)


@pytest.mark.parametrize("lm_head_pass", ["fused", "autograd", "full_logits"])
def test_gradient_is_policy_gradient_plus_k3_kl_to_the_proxy(lm_head_pass):
    """Token-mean of -A logp + beta k3(logp, proxy) (TRL 0.16 GRPOTrainer.compute_loss,
    as NOVER's trainer.py uses it), with the proxy made different from the policy."""
    policy, tok = tiny_policy(lm_head_pass)
    cfg = config()
    obj = NOVER(cfg, tok)
    obj.attach(policy)
    with torch.no_grad():
        for p in obj.proxy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    samples = make_samples(tok, n_groups=2)
    ctx = context(policy)
    rewards = obj.score(samples, ctx)
    accumulate_gradients(cfg, obj, "token_mean", policy, samples, rewards, ctx)
    got = grads(policy)

    policy.zero_grad(set_to_none=True)
    batch = pack(obj.sequences(samples).sequences)
    logp = policy(batch).double()
    with torch.no_grad():
        ref = obj.proxy(batch).double()
    from pyvf.ops import grouped_advantages

    adv = grouped_advantages(rewards.float(), torch.tensor([s.group for s in samples]), estimator="grpo",
                             eps=1e-4).double()
    seg = torch.repeat_interleave(torch.arange(len(samples)), batch.cu_seqlens.diff())
    mask = batch.roles == ROLE_REASONING
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    loss = ((-adv[seg] * logp + 0.1 * kl) * mask).sum() / mask.sum()
    loss.backward()
    want = grads(policy)
    assert torch.linalg.norm(got - want) / torch.linalg.norm(want) < 1e-5
    assert ctx.metrics["kl"][0] > 0


def test_proxy_sync_and_state():
    policy, tok = tiny_policy()
    cfg = config(proxy_sync_every=2)
    obj = NOVER(cfg, tok)
    obj.attach(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    before = [p.clone() for p in obj.proxy.parameters()]
    samples = make_samples(tok, n_groups=1)
    obj.score(samples, context(policy, step=2))  # (2 - 1) % 2 != 0: no sync
    assert all(torch.equal(a, b) for a, b in zip(before, obj.proxy.parameters()))
    obj.score(samples, context(policy, step=3))
    for a, p_policy, p_proxy in zip(before, policy.parameters(), obj.proxy.parameters()):
        assert torch.allclose(p_proxy, 0.9 * a + 0.1 * p_policy)
    state = obj.state_dict()
    other = NOVER(cfg, tok)
    other.attach(tiny_policy()[0])
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.proxy.parameters(), obj.proxy.parameters()))
