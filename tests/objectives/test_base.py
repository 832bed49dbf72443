"""The pieces every objective shares: loss aggregation over micro-batches and ranks,
the registry, and the mapping of per-token values onto packed rows."""

import pytest
import torch

from pyvf.objectives import Objective, get_objective, objective_names, register_objective
from pyvf.objectives.base import MicroBatch, aggregation_scale, per_token_rows
from pyvf.packing import ROLE_REASONING, Sequence, pack


def micro_batch(seqs, owner, prefix=None):
    batch = pack(seqs)
    row_sequence = torch.repeat_interleave(torch.arange(len(seqs)), batch.cu_seqlens.diff())
    prefix = prefix if prefix is not None else [len(s.reasoning_ids) for s in seqs]
    return MicroBatch(batch, list(range(len(seqs))), seqs, prefix, torch.tensor(owner), row_sequence,
                      torch.device("cpu"))


def _verl_agg(per_token, mask, mode):
    """verl core_algos.agg_loss (OpenBMB/RLPR verl/trainer/ppo/core_algos.py) on one padded
    [B, L] batch: token-mean, seq-mean-token-sum, seq-mean-token-mean."""
    if mode == "token_mean":
        return (per_token * mask).sum() / mask.sum()
    seq = (per_token * mask).sum(-1)
    if mode == "seq_mean_token_sum":
        return seq.mean()
    return (seq / mask.sum(-1)).mean()


@pytest.mark.parametrize("mode", ["seq_mean_token_sum", "token_mean", "seq_mean_token_mean"])
def test_aggregation_over_micro_batches_matches_verl(mode):
    """Two micro-batches scaled with the step's global counts sum to verl's agg_loss of
    the whole step."""
    lengths = [3, 1, 5, 2, 4]
    adv = torch.randn(5, dtype=torch.float64)
    width = max(lengths)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).double()
    token_loss = torch.randn(5, width, dtype=torch.float64)
    want = _verl_agg(adv[:, None] * token_loss, mask, mode)
    seqs = [Sequence([7], list(range(1, n + 1)), [], group=i) for i, n in enumerate(lengths)]
    rows_per_sample = torch.tensor(lengths, dtype=torch.float64)
    total = 0.0
    for part in ([0, 1], [2, 3, 4]):
        mb = micro_batch([seqs[i] for i in part], part)
        scale = aggregation_scale(mode, mb, trained_rows_per_sample=rows_per_sample, n_samples=5,
                                  n_trained_rows=sum(lengths))
        trained = mb.batch.roles == ROLE_REASONING
        values = torch.zeros(mb.batch.input_ids.numel(), dtype=torch.float64)
        values[trained] = torch.cat([token_loss[i, :lengths[i]] for i in part])
        raw = adv[mb.owner][mb.row_sequence]
        total += float((raw * scale.double() * values)[trained].sum())
    assert total == pytest.approx(float(want), rel=1e-6)


def test_aggregation_rejects_unknown_mode():
    mb = micro_batch([Sequence([1], [2], [], group=0)], [0])
    with pytest.raises(ValueError, match="loss_agg must be one of"):
        aggregation_scale("sum", mb, trained_rows_per_sample=torch.ones(1), n_samples=1, n_trained_rows=1)


def test_per_token_rows_places_values_on_predicting_rows():
    seqs = [Sequence([5, 6], [1, 2, 3], [9], group=0), Sequence([5], [4, 4], [], group=0)]
    mb = micro_batch(seqs, [1, 0], prefix=[2, 2])
    out = per_token_rows(mb, [[0.1, 0.2], [1.0, 2.0, 3.0]])
    # Sequence 0 (sample 1): rows 1 and 2 predict its first two reasoning tokens; its
    # third reasoning token and the answer are not sampled tokens here (prefix 2).
    want = torch.full((out.numel(),), float("nan"), dtype=torch.float64)
    want[[1, 2]] = torch.tensor([1.0, 2.0], dtype=torch.float64)
    want[[6, 7]] = torch.tensor([0.1, 0.2], dtype=torch.float64)
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    assert torch.equal(out[~torch.isnan(out)], want[~torch.isnan(want)])
    assert mb.batch.targets[1] == 1 and mb.batch.targets[6] == 4


class Mine(Objective):
    name = "mine"


def test_registry(monkeypatch):
    from pyvf import objectives

    monkeypatch.setattr(objectives, "_REGISTRY", dict(objectives._REGISTRY))  # leave no "mine" behind
    assert {"verifree", "rlpr", "nover", "verifier", "pcl", "rzero", "selfrubric"} <= set(objective_names())
    assert get_objective("verifree").name == "verifree"
    assert get_objective("test_base:Mine") is Mine
    register_objective("mine", Mine)
    assert get_objective("mine") is Mine
    with pytest.raises(ValueError, match="must be one of"):
        get_objective("nonsense")
    with pytest.raises(ValueError, match="cannot be imported"):
        get_objective("no_such_module:Thing")
    with pytest.raises(ValueError, match="not a subclass"):
        get_objective("torch:Tensor")
    with pytest.raises(ValueError, match="subclass"):
        register_objective("bad", dict)


def test_score_rows_equal_each_sequence_alone():
    """The no-grad scoring used by RLPR and NOVER gives each sequence's log-probs as its
    own forward does, whatever the chunking."""
    from helpers import context, tiny_policy

    from pyvf.runtime.policy import score_rows

    policy, tok = tiny_policy()
    seqs = [Sequence([1, 2, 3], [4, 5], [6], group=0), Sequence([7], [8, 9, 10, 11], [], group=1),
            Sequence([3, 3], [], [2, 2, 2], group=2)]
    ctx = context(policy)
    together = score_rows(policy, seqs, 64, temperature=ctx.temperature, device=ctx.device)
    for seq, lp in zip(seqs, together):
        alone = policy(pack([seq])).double()
        n = len(seq) - len(seq.prompt_ids)
        assert lp.shape == (n,)
        assert torch.allclose(lp, alone[len(seq.prompt_ids) - 1:len(seq.prompt_ids) - 1 + n], atol=1e-5)
    chunked = score_rows(policy, seqs, 8, temperature=ctx.temperature, device=ctx.device)
    for a, b in zip(together, chunked):
        assert torch.allclose(a, b, atol=1e-5)
