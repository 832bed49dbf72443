import math

import pytest
import torch

from pyvf.losses import verifree_loss
from pyvf.packing import ROLE_ANSWER, ROLE_PROMPT, ROLE_REASONING


def random_packed(n_seq, with_missing_answers=True):
    lengths = torch.randint(3, 12, (n_seq,))
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    roles = []
    for i, n in enumerate(lengths.tolist()):
        p = torch.randint(1, n - 1, ()).item()
        a = 0 if (with_missing_answers and i % 5 == 3) else torch.randint(1, n - p + 1, ()).item()
        r = n - p - a
        roles += [ROLE_PROMPT] * p + [ROLE_REASONING] * r + [ROLE_ANSWER] * a
    roles = torch.tensor(roles)
    logprobs = -torch.rand(int(cu[-1]), dtype=torch.float64) * 0.5
    logprobs[roles == ROLE_PROMPT] = 0.0
    return logprobs.requires_grad_(), roles, cu


def definition(logprobs, roles, cu, groups, completion, weights):
    """docs/algorithms.md / 1.2 written out one completion at a time."""
    lp = logprobs.detach().tolist()
    seqs = []
    for b in range(len(cu) - 1):
        lo, hi = cu[b].item(), cu[b + 1].item()
        reasoning = sum(lp[t] for t in range(lo, hi) if roles[t] == ROLE_REASONING)
        answer = [lp[t] for t in range(lo, hi) if roles[t] == ROLE_ANSWER]
        seqs.append((reasoning, sum(answer), len(answer) > 0))
    comps = sorted(set(completion))
    reward = {c: sum(weights[b] * (math.exp(seqs[b][1]) if seqs[b][2] else 0.0)
                     for b in range(len(seqs)) if completion[b] == c) for c in comps}
    first = {c: min(b for b in range(len(seqs)) if completion[b] == c) for c in comps}
    group = {c: groups[first[c]] for c in comps}
    total = 0.0
    for c in comps:
        # As verifree_rewards computes them: float32 rewards into grouped_advantages, which
        # works in double and returns float32. The loss, a sum that cancels to ~1e-3 of its
        # terms, would otherwise differ from an all-float64 definition at ~1e-6.
        r32 = {d: float(torch.tensor(reward[d], dtype=torch.float32)) for d in comps}
        others = [r32[d] for d in comps if group[d] == group[c] and d != c]
        adv = r32[c] - sum(others) / len(others) if others else 0.0
        adv = float(torch.tensor(adv, dtype=torch.float32))
        sft = sum(weights[b] * (math.exp(seqs[b][1]) if seqs[b][2] else 0.0) * seqs[b][1]
                  for b in range(len(seqs)) if completion[b] == c)
        total += -(adv * seqs[first[c]][0] + sft)
    return total / len(comps), reward


@pytest.mark.parametrize("trial", range(5))
def test_single_reference_matches_definition(trial):
    n_groups, g = 3, 4
    logprobs, roles, cu = random_packed(n_groups * g)
    groups = torch.arange(n_groups).repeat_interleave(g)
    out = verifree_loss(logprobs, roles, cu, g)
    out_ids = verifree_loss(logprobs, roles, cu, groups)
    want, reward = definition(logprobs, roles, cu, groups.tolist(), list(range(n_groups * g)), [1.0] * (n_groups * g))
    assert out.loss.item() == pytest.approx(want, rel=1e-6)
    assert out_ids.loss.item() == pytest.approx(want, rel=1e-6)
    assert out.rewards.tolist() == pytest.approx([reward[c] for c in range(n_groups * g)], rel=1e-6)
    assert out.found.tolist() == [i % 5 != 3 for i in range(n_groups * g)]
    assert torch.all(out.rewards[~out.found] == 0)


def test_gradient_is_the_estimator():
    logprobs, roles, cu = random_packed(8)
    out = verifree_loss(logprobs, roles, cu, 4)
    out.loss.backward()
    seg = torch.repeat_interleave(torch.arange(8), cu.diff())
    want = torch.zeros_like(logprobs)
    reasoning, answer = roles == ROLE_REASONING, roles == ROLE_ANSWER
    want[reasoning] = -out.advantages.double()[seg[reasoning]] / 8
    want[answer] = -out.rewards.double()[seg[answer]] / 8
    assert torch.allclose(logprobs.grad, want, rtol=1e-6, atol=1e-9)


def test_multi_reference_weights():
    # 2 groups x 3 completions, completion 1 and 4 with two references each.
    logprobs, roles, cu = random_packed(8, with_missing_answers=False)
    completion = torch.tensor([0, 1, 1, 2, 3, 4, 4, 5])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    weights = torch.tensor([1.0, 0.25, 0.75, 1.0, 1.0, 0.5, 0.5, 1.0])
    out = verifree_loss(logprobs, roles, cu, groups, completion=completion, weights=weights)
    want, reward = definition(logprobs, roles, cu, groups.tolist(), completion.tolist(), weights.tolist())
    assert out.loss.item() == pytest.approx(want, rel=1e-6)
    assert out.rewards.tolist() == pytest.approx([reward[c] for c in range(6)], rel=1e-6)
    default = verifree_loss(logprobs, roles, cu, groups, completion=completion)
    uniform = torch.tensor([1.0, 0.5, 0.5, 1.0, 1.0, 0.5, 0.5, 1.0])
    assert default.loss.item() == pytest.approx(
        definition(logprobs, roles, cu, groups.tolist(), completion.tolist(), uniform.tolist())[0], rel=1e-6)


def test_micro_batch_normalization():
    logprobs, roles, cu = random_packed(4)
    full = verifree_loss(logprobs, roles, cu, 4)
    scaled = verifree_loss(logprobs, roles, cu, 4, num_completions_total=8)
    assert scaled.loss.item() == pytest.approx(full.loss.item() / 2)


def test_bad_shapes():
    logprobs, roles, cu = random_packed(4)
    with pytest.raises(ValueError, match="logprobs and roles"):
        verifree_loss(logprobs, roles[:-1], cu, 4)
    with pytest.raises(ValueError, match="completion must have shape"):
        verifree_loss(logprobs, roles, cu, 4, completion=torch.arange(3))


# --- the objective inside the trainer ------------------------------------------------------

from helpers import TEXTS, config, context, grads, make_samples, tiny_policy  # noqa: E402

from pyvf.objectives.verifree import VeriFree  # noqa: E402
from pyvf.packing import pack  # noqa: E402
from pyvf.options import ConfigError  # noqa: E402
from pyvf.train.trainer import accumulate_gradients  # noqa: E402


def _three_groups(tok):
    """Two groups of four completions and a third of two (a group that fits where the others don't)."""
    samples = make_samples(tok)
    small = make_samples(tok, texts=TEXTS[:2], n_groups=1)
    for s in small:
        s.group = s.example_index = 2
    return samples + small


def _budgets(objective, samples):
    """Token budgets: every group fits, only the small group fits, one sequence fits."""
    ts = objective.sequences(samples)
    size = {}
    for q in ts.sequences:
        size[q.group] = size.get(q.group, 0) + len(q)
    return {"all": 8192, "small group": size[2], "one sequence": max(len(q) for q in ts.sequences)}


@pytest.mark.parametrize("reward_pass,budget", [("fused", "all"), ("separate", "all"), ("separate", "one sequence"),
                                                ("auto", "all"), ("auto", "small group"),
                                                ("auto", "one sequence")])
@pytest.mark.parametrize("lm_head_pass", ["fused", "autograd", "full_logits"])
def test_trainer_gradient_equals_verifree_loss(reward_pass, budget, lm_head_pass):
    """The coefficients the objective hands the lm_head pass (-A on the reasoning and
    -w R on the answers), accumulated over micro-batches, give the gradient of
    verifree_loss on the whole packed batch, whether the rewards come from the
    gradient forward (fused: the answer rows looked at first, whole groups per
    micro-batch) or from the separate no-grad reward pass (any micro-batches), or
    both in one step (auto with a budget that fits one group only)."""
    policy, tok = tiny_policy(lm_head_pass)
    samples = _three_groups(tok)
    objective = VeriFree(config(), tok)
    cfg = config(micro_batch_tokens=_budgets(objective, samples)[budget], reward_pass=reward_pass)
    objective = VeriFree(cfg, tok)
    ctx = context(policy)
    sums = accumulate_gradients(cfg, objective, "seq_mean_token_sum", policy, samples, None, ctx)
    got = grads(policy)
    n_seq = 2 * 7 + 4
    expect_separated = {"fused": 0, "separate": n_seq,
                        "auto": {"all": 0, "small group": n_seq - 4, "one sequence": n_seq}[budget]}[reward_pass]
    assert sums["separated"] == expect_separated and sums["sequences"] == n_seq
    if budget == "one sequence":
        assert sums["micro_batches"] > 3

    policy.zero_grad(set_to_none=True)
    ts = objective.sequences(samples)
    batch = pack(ts.sequences)
    logprobs = policy(batch)
    weights = torch.tensor(ts.data["weight"])
    out = verifree_loss(logprobs, batch.roles, batch.cu_seqlens, batch.groups, completion=torch.tensor(ts.owner),
                        weights=weights)
    out.loss.backward()
    want = grads(policy)
    assert torch.linalg.norm(got - want) / torch.linalg.norm(want) < 1e-5
    assert sums["loss"] == pytest.approx(out.loss.item(), rel=1e-5)
    reward, count, _ = sums["objective"]["reward_mean"]
    assert count == len(samples) and reward == pytest.approx(out.rewards.sum().item(), rel=1e-5)
    found, count, _ = sums["objective"]["rewarded_frac"]
    assert (found, count) == (float(out.found.sum()), len(samples))
    # The three completions with an answer are rewarded, the right ones far more.
    r = out.rewards[:8].view(2, 4)
    assert torch.all(r[:, 2] == 0) and torch.all(r[:, [0, 1, 3]] > 0)
    assert torch.all(r[:, 0] > 100 * r[:, 1])


def test_fused_reward_pass_refuses_a_group_over_the_budget():
    policy, tok = tiny_policy()
    samples = make_samples(tok)
    cfg = config(micro_batch_tokens=_budgets(VeriFree(config(), tok), _three_groups(tok))["small group"],
                 reward_pass="fused")
    with pytest.raises(ConfigError, match=r"group 0 has \d+ tokens, more than micro_batch_tokens .*reward_pass "
                                          r"fused .* use reward_pass auto or separate"):
        accumulate_gradients(cfg, VeriFree(cfg, tok), "seq_mean_token_sum", policy, samples, None, context(policy))


def test_separate_pass_sends_only_answer_rows_through_the_lm_head(monkeypatch):
    """The no-grad reward pass computes log-probs of the answer rows alone: the other
    rows' targets are ignored, so the lm_head does no work on them."""
    import pyvf.runtime.policy as policy_module

    policy, tok = tiny_policy()
    samples = make_samples(tok)
    cfg = config(reward_pass="separate")
    seen = []
    real = policy_module.token_logprobs

    def spy(hidden, weight, targets, **kw):
        if not torch.is_grad_enabled():
            seen.append((targets != kw.get("ignore_index", -100)).sum().item())
        return real(hidden, weight, targets, **kw)

    monkeypatch.setattr(policy_module, "token_logprobs", spy)
    accumulate_gradients(cfg, VeriFree(cfg, tok), "seq_mean_token_sum", policy, samples, None, context(policy))
    ts = VeriFree(cfg, tok).sequences(samples)
    assert sum(seen) == sum(len(q.answer_ids) for q in ts.sequences) > 0


def test_sequences_cut_and_references():
    policy, tok = tiny_policy()
    objective = VeriFree(config(), tok)
    samples = make_samples(tok)
    ts = objective.sequences(samples)
    # Two references for each completion with an answer, one sequence for the others.
    per_sample = [ts.owner.count(i) for i in range(len(samples))]
    assert per_sample == [2, 2, 1, 2] * 2
    for seq, i in zip(ts.sequences, ts.owner):
        assert seq.group == samples[i].group
        if per_sample[i] == 1:
            assert seq.answer_ids == [] and seq.reasoning_ids == samples[i].ids
        else:
            assert tok.decode(seq.answer_ids).strip().startswith("> \\boxed{")
    # Only the first copy of a completion counts sampled tokens (for rollout_logprob_diff).
    assert [p > 0 for p in ts.sampled_prefix] == [True, False, True, False, True, True, False] * 2


# --- reward forms and JEPO ------------------------------------------------------------------

from pyvf.objectives.verifree import JEPO  # noqa: E402


def _per_sequence(logprobs, batch, ts, role):
    """[(completion, sequence's rows of `role` as a differentiable 1-D tensor)] per packed sequence."""
    starts = batch.cu_seqlens.tolist()
    out = []
    for b, i in enumerate(ts.owner):
        rows = slice(starts[b], starts[b + 1])
        out.append(logprobs[rows][batch.roles[rows] == role])
    return out


def _trainer_then_written_out(objective, cfg, policy, samples):
    """(sums, the trainer's gradient, ts, per-sequence answer rows, per-sequence
    reasoning rows): accumulate_gradients, then a plain differentiable forward of the
    same sequences for the loss written out (the gradients zeroed in between)."""
    sums = accumulate_gradients(cfg, objective, "seq_mean_token_sum", policy, samples, None, context(policy))
    got = grads(policy)
    policy.zero_grad(set_to_none=True)
    ts = objective.sequences(samples)
    batch = pack(ts.sequences)
    logprobs = policy(batch).double()
    return (sums, got, ts, _per_sequence(logprobs, batch, ts, ROLE_ANSWER),
            _per_sequence(logprobs, batch, ts, ROLE_REASONING))


def _written_out_reward(form, answer):
    """The reward of one reference from its answer rows' log-probs, differentiable, by its definition."""
    if answer.numel() == 0:
        return torch.zeros((), dtype=answer.dtype)
    return {"prob": lambda a: a.sum().exp(), "logprob": lambda a: a.sum(),
            "mean_logprob": lambda a: a.mean(), "mean_prob": lambda a: a.exp().mean()}[form](answer)


@pytest.mark.parametrize("form", ["prob", "logprob", "mean_logprob", "mean_prob"])
@pytest.mark.parametrize("reward_pass", ["fused", "separate"])
def test_reward_forms_give_the_gradient_of_the_objective_written_out(form, reward_pass):
    """For each reward form R of the reference: the trainer's gradient equals autograd
    through loss = sum_i [-A_i sum_{t in z_i} log pi(t) - sum_k w_k R_ik] / n, with A_i the
    RLOO advantage of the detached R_i; so the answer rows get -w_k dR_ik / d log pi(t)."""
    policy, tok = tiny_policy("autograd")
    samples = make_samples(tok)
    cfg = config(reward_form=form, reward_pass=reward_pass)
    objective = VeriFree(cfg, tok)
    sums, got, ts, answers, reasoning = _trainer_then_written_out(objective, cfg, policy, samples)
    n = len(samples)
    reward = [torch.zeros((), dtype=torch.float64) for _ in range(n)]
    reasoning_sum = [None] * n
    for b, i in enumerate(ts.owner):
        reward[i] = reward[i] + ts.data["weight"][b] * _written_out_reward(form, answers[b])
        if ts.data["first_copy"][b]:
            reasoning_sum[i] = reasoning[b].sum()
    r = torch.stack(reward).detach()
    groups = torch.tensor([s.group for s in samples])
    adv = torch.stack([r[i] - r[(groups == groups[i]) & (torch.arange(n) != i)].mean() for i in range(n)])
    loss = sum(-adv[i] * reasoning_sum[i] - reward[i] for i in range(n)) / n
    loss.backward()
    want = grads(policy)
    assert torch.linalg.norm(got - want) / torch.linalg.norm(want) < 1e-5
    assert sums["objective"]["reward_mean"][0] == pytest.approx(float(r.sum()), rel=1e-5)
    # The log forms score every completion (the truncated one without a marker too).
    found = sums["objective"]["rewarded_frac"][0]
    assert found == (n if form in ("logprob", "mean_logprob") else n - 2)


@pytest.mark.parametrize("reward_pass", ["fused", "separate"])
@pytest.mark.parametrize("normalize", [True, False])
def test_jepo_gradient_equals_the_bound_written_out(reward_pass, normalize):
    """JEPO: per group, L = log (1/G) sum_i p_i with p_i = sum_k w_k pi(y*_k | x, z_i);
    A_i = L - log (1/(G-1)) sum_{j != i} p_j (clip(A / std, -1, 1) with jepo_normalize);
    the gradient is that of sum_g [-sum_i A_i log pi(z_i) - L_g] / n."""
    policy, tok = tiny_policy("autograd")
    samples = make_samples(tok)
    cfg = config(objective="jepo", reward_pass=reward_pass, jepo_normalize=normalize)
    objective = JEPO(cfg, tok)
    sums, got, ts, answers, reasoning = _trainer_then_written_out(objective, cfg, policy, samples)
    n = len(samples)
    assert all(a.numel() > 0 for a in answers)  # every completion scored
    p = [torch.zeros((), dtype=torch.float64) for _ in range(n)]
    reasoning_sum = [None] * n
    for b, i in enumerate(ts.owner):
        p[i] = p[i] + ts.data["weight"][b] * answers[b].sum().exp()
        if ts.data["first_copy"][b]:
            reasoning_sum[i] = reasoning[b].sum()
    p = torch.stack(p)
    groups = torch.tensor([s.group for s in samples])
    loss = torch.zeros((), dtype=torch.float64)
    bounds = []
    for g in groups.unique():
        members = (groups == g).nonzero().squeeze(1)
        size = members.numel()
        bound = torch.log(p[members].mean())
        bounds.append(bound.item())
        with torch.no_grad():
            adv = torch.stack([bound - torch.log(p[members[torch.arange(size) != j]].mean()) for j in range(size)])
            if normalize:
                adv = (adv / adv.std()).clamp(-1, 1)
        loss = loss - sum(adv[j] * reasoning_sum[int(members[j])] for j in range(size)) - bound
    (loss / n).backward()
    want = grads(policy)
    assert torch.linalg.norm(got - want) / torch.linalg.norm(want) < 1e-5
    total, count, _ = sums["objective"]["jepo_bound"]
    assert total / count == pytest.approx(sum(bounds) / len(bounds), rel=1e-6)
