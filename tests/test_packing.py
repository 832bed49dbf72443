import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvf.packing import (
    IGNORE_INDEX, ROLE_ANSWER, ROLE_POST, ROLE_PROMPT, ROLE_REASONING, Sequence, pack, plan_micro_batches, unpack,
)

token_lists = st.lists(st.integers(0, 999), max_size=8)


@st.composite
def sequences(draw):
    n = draw(st.integers(1, 6))
    out = []
    for _ in range(n):
        prompt = draw(st.lists(st.integers(0, 999), min_size=1, max_size=8))
        out.append(Sequence(prompt, draw(token_lists), draw(token_lists), draw(st.integers(0, 3)),
                            draw(token_lists)))
    return out


@settings(max_examples=100, deadline=None)
@given(seqs=sequences())
def test_pack_round_trip_and_layout(seqs):
    batch = pack(seqs)
    assert unpack(batch) == seqs
    assert batch.cu_seqlens.tolist() == [0] + torch.tensor([len(s) for s in seqs]).cumsum(0).tolist()
    assert batch.groups.tolist() == [s.group for s in seqs]
    for b, s in enumerate(seqs):
        lo, hi = batch.cu_seqlens[b].item(), batch.cu_seqlens[b + 1].item()
        ids, roles = s.ids(), s.token_roles()
        assert batch.input_ids[lo:hi].tolist() == ids
        assert batch.position_ids[lo:hi].tolist() == list(range(len(ids)))
        for t in range(len(ids)):
            nxt_role = roles[t + 1] if t + 1 < len(ids) else ROLE_PROMPT
            assert batch.roles[lo + t].item() == nxt_role
            want = ids[t + 1] if nxt_role != ROLE_PROMPT else IGNORE_INDEX
            assert batch.targets[lo + t].item() == want
        # Every reasoning, answer and post token is predicted exactly once.
        assert (batch.roles[lo:hi] == ROLE_REASONING).sum() == len(s.reasoning_ids)
        assert (batch.roles[lo:hi] == ROLE_ANSWER).sum() == len(s.answer_ids)
        assert (batch.roles[lo:hi] == ROLE_POST).sum() == len(s.post_ids)


@settings(max_examples=50, deadline=None)
@given(seqs=sequences())
def test_padded_view_matches_packed(seqs):
    batch = pack(seqs)
    padded = batch.padded(pad_id=7)
    b, length = padded.input_ids.shape
    assert b == len(seqs) and length == max(len(s) for s in seqs)
    idx = padded.flat_positions()
    assert torch.equal(padded.input_ids.flatten()[idx], batch.input_ids)
    assert torch.equal(padded.targets.flatten()[idx], batch.targets)
    assert torch.equal(padded.roles.flatten()[idx], batch.roles)
    assert torch.equal(padded.position_ids.flatten()[idx], batch.position_ids)
    pad = padded.attention_mask == 0
    assert torch.all(padded.input_ids[pad] == 7) and torch.all(padded.targets[pad] == IGNORE_INDEX)
    assert padded.attention_mask.sum(1).tolist() == [len(s) for s in seqs]


def test_pack_rejects_empty():
    with pytest.raises(ValueError, match="sequences must not be empty"):
        pack([])
    with pytest.raises(ValueError, match=r"sequences\[1\] has no tokens"):
        pack([Sequence([1], [], [], 0), Sequence([], [], [], 0)])


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_planner_invariants(data):
    n = data.draw(st.integers(0, 40))
    lengths = data.draw(st.lists(st.integers(1, 50), min_size=n, max_size=n))
    groups = data.draw(st.lists(st.integers(0, 9), min_size=n, max_size=n))
    group_sizes = {}
    for length, g in zip(lengths, groups):
        group_sizes[g] = group_sizes.get(g, 0) + length
    biggest = max(group_sizes.values(), default=1)
    budget = data.draw(st.integers(biggest, biggest + 400))
    plan = plan_micro_batches(lengths, groups, budget)
    flat = [i for mb in plan for i in mb]
    assert sorted(flat) == list(range(n))                      # every sequence exactly once
    for mb in plan:
        assert sum(lengths[i] for i in mb) <= budget           # within budget
        assert mb == sorted(mb)
    where = {}
    for b, mb in enumerate(plan):
        for i in mb:
            assert where.setdefault(groups[i], b) == b         # a group never splits


def test_planner_group_over_budget_names_the_budget():
    with pytest.raises(ValueError, match=r"group 3 has 12 tokens, more than the micro-batch token budget \(10\)"):
        plan_micro_batches([6, 6, 2], [3, 3, 1], 10)
    with pytest.raises(ValueError, match="token_budget must be a positive int"):
        plan_micro_batches([1], [0], 0)


def test_planner_packs_tightly():
    # Four groups of 4 tokens into budget 8: two micro-batches.
    assert len(plan_micro_batches([2] * 8, [0, 0, 1, 1, 2, 2, 3, 3], 8)) == 2
