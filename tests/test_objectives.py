"""The objectives' reward plumbing on a hand-made rollout: which completions count as
valid, how references weigh in, and the policy-gradient loss."""

import pytest
import torch

from pyvf.assets import load_tokenizer
from pyvf.objectives import OBJECTIVES, Sampled, policy_gradient_loss
from pyvf.packing import ROLE_REASONING, Sequence, pack
from pyvf.splice import splice_reference


def sampled(tok, text, answers=("8/5", "1.6"), group=0, truncated=False):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    prompt = tok("Question: q\nReasoning:", add_special_tokens=False)["input_ids"]
    spliced = splice_reference(tok, ids, list(answers))
    return Sampled(prompt, ids, truncated, spliced, tuple(answers), tuple(1 / len(answers) for _ in answers), group)


def test_verifier_rewards_from_samples():
    tok = load_tokenizer()
    obj = OBJECTIVES["verifier"](tok)
    samples = [sampled(tok, " 8 / 5 = 8/5. <answer> \\boxed{8/5} </answer>"),
               sampled(tok, " 8 / 5 = 2. <answer> \\boxed{2} </answer>"),
               sampled(tok, " 1.6 <answer> \\boxed{1.6} </answer>")]
    assert obj.rewards(samples, None, 1.0, 1).tolist() == [1.0, 0.0, 1.0]


class ConstantPolicy(torch.nn.Module):
    """Log-prob log(0.5) on every scored row: reference spans score 0.5 everywhere."""

    def forward(self, batch, temperature=1.0):
        return torch.where(batch.targets >= 0, torch.log(torch.tensor(0.5)), torch.tensor(0.0))


def test_rlpr_invalid_completions_get_no_probability_reward():
    tok = load_tokenizer()
    obj = OBJECTIVES["rlpr"](tok)
    samples = [sampled(tok, " 8 / 5 = 8/5. <answer> \\boxed{8/5} </answer>"),
               sampled(tok, " no marker here"),
               sampled(tok, " 8/5 <answer> \\boxed{8/5}", truncated=True)]
    r = obj.rewards(samples, ConstantPolicy(), 1.0, 1)
    # B = A = 0.5 under a constant policy: no gain; format 0.1 only for the valid completion.
    assert r.tolist() == pytest.approx([0.1, 0.0, 0.0])
    assert len(obj.no_reasoning_cache) == 2  # one no-reasoning score per (prompt, reference), cached


def test_nover_ranks_valid_completions_only():
    tok = load_tokenizer()
    obj = OBJECTIVES["nover"](tok, policy=ConstantPolicy())
    samples = [sampled(tok, " 8 / 5 = 8/5. <answer> \\boxed{8/5} </answer>"),
               sampled(tok, " no marker")]
    r = obj.rewards(samples, ConstantPolicy(), 1.0, 1)
    assert r.tolist() == [2.0, 0.0]  # the only valid completion: format 1 + rank 1, no efficiency term


def test_policy_gradient_loss_gradient():
    seqs = [Sequence([1, 2], [3, 4, 5], [], group=0), Sequence([1], [6, 7], [], group=0)]
    batch = pack(seqs)
    logprobs = torch.zeros(batch.input_ids.numel(), requires_grad=True)
    adv = torch.tensor([0.5, -2.0])
    policy_gradient_loss(logprobs, batch.roles, batch.cu_seqlens, adv, 2).backward()
    seg = torch.repeat_interleave(torch.arange(2), batch.cu_seqlens.diff())
    want = torch.where(batch.roles == ROLE_REASONING, -adv[seg] / 2, torch.zeros(()))
    assert torch.equal(logprobs.grad, want)


def test_ppo_clip_loss_by_hand():
    from pyvf.objectives import ppo_clip_loss

    seqs = [Sequence([1], [2, 3], [], group=0), Sequence([1], [4, 5], [], group=0)]
    batch = pack(seqs)
    logprobs = torch.zeros(batch.input_ids.numel(), requires_grad=True)
    reasoning = batch.roles == ROLE_REASONING
    # ratio 1.5 everywhere: above 1 + 0.27, so positive advantages are clipped (no gradient)
    # and negative ones are not (min picks the unclipped 1.5 * A).
    old = torch.where(reasoning, -torch.log(torch.tensor(1.5)), torch.tensor(0.0))
    adv = torch.tensor([2.0, -1.0])
    loss = ppo_clip_loss(logprobs, old, batch.roles, batch.cu_seqlens, adv, 2)
    assert loss.item() == pytest.approx(-(2 * 1.27 * 2.0 + 2 * 1.5 * -1.0) / 2, rel=1e-5)
    loss.backward()
    seg = torch.repeat_interleave(torch.arange(2), batch.cu_seqlens.diff())
    want = torch.where(reasoning & (seg == 1), torch.tensor(1.5 / 2), torch.tensor(0.0))
    assert torch.allclose(logprobs.grad, want)
    # At ratio 1 it is the policy-gradient loss's gradient.
    lp = torch.zeros(batch.input_ids.numel(), requires_grad=True)
    ppo_clip_loss(lp, torch.zeros_like(lp), batch.roles, batch.cu_seqlens, adv, 2).backward()
    lp2 = torch.zeros(batch.input_ids.numel(), requires_grad=True)
    policy_gradient_loss(lp2, batch.roles, batch.cu_seqlens, adv, 2).backward()
    assert torch.allclose(lp.grad, lp2.grad)
