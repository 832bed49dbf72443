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


# -- the objective ------------------------------------------------------------------------

import torch  # noqa: E402
from helpers import QUESTION, config, context, grads, tiny_policy  # noqa: E402

from pyvf.data.synthetic import PCL_PROMPT_TEMPLATE  # noqa: E402
from pyvf.objectives.base import Sample  # noqa: E402
from pyvf.objectives.pcl import PCL, pcl_answer_format, pcl_evaluation_text, pcl_full_format  # noqa: E402
from pyvf.packing import ROLE_POST, ROLE_REASONING, pack  # noqa: E402
from pyvf.runtime.rollout import Completion  # noqa: E402
from pyvf.train.trainer import accumulate_gradients  # noqa: E402

RIGHT = " 3 + 10 = 13. 13 - 9 = 4. 4 / 5 = 4/5. <answer> \\boxed{4/5} </answer>"
SKIPPED = " 3 + 10 = 13. 13 / 5 = 13/5. <answer> \\boxed{13/5} </answer>"


def test_formats():
    """The answer part (official `format_reward`, on pyvf's answer block instead of think
    tags) and the full answer-evaluation-reward format (official `format_reward_all`)."""
    assert pcl_answer_format(RIGHT) == 1.0
    assert pcl_answer_format(" 13 / 5. <answer> \\boxed{13/5} </answer>  ") == 1.0
    for bad in [" 4/5", " <answer> 4/5 </answer>", " <answer> \\boxed{} </answer>",
                " <answer> \\boxed{1} </answer> <answer> \\boxed{2} </answer>", RIGHT + " more"]:
        assert pcl_answer_format(bad) == 0.0, bad
    post = " <evaluation> The answer is right. </evaluation> <reward> [1, 1] </reward>"
    assert pcl_full_format(RIGHT, post) == 1.0
    assert pcl_full_format(" 4/5", post) == 0.0
    for bad in ["", " <reward> [1, 1] </reward>", " <evaluation> x </evaluation>", post + " extra"]:
        assert pcl_full_format(RIGHT, bad) == 0.0, bad


def test_evaluation_text_round_trips():
    assert pcl_evaluation_text(1.0, 1.0) == (" <evaluation> The answer is right. </evaluation> "
                                             "<reward> [1, 1] </reward>")
    assert "wrong" in pcl_evaluation_text(0.0, 1.0)
    for acc, fmt in [(1.0, 1.0), (0.0, 1.0), (0.0, 0.0), (0.42, 1.0)]:
        assert parse_pcl_reward(pcl_evaluation_text(acc, fmt)) == [acc, fmt]
    assert pcl_consistency([0.42, 1.0], parse_pcl_reward(pcl_evaluation_text(0.42, 1.0))) == 1.0


def pcl_samples(tok, posts):
    """One group: the right and the skipped answer, each followed by a post-answer text."""
    from pyvf.data.dataset import Example

    prompt = tok(PCL_PROMPT_TEMPLATE.format(question=QUESTION), add_special_tokens=False)["input_ids"]
    ex = Example(QUESTION, ("4/5", "0.8"), (0.5, 0.5))
    samples = []
    for k, (answer, post) in enumerate(zip([RIGHT, SKIPPED, RIGHT, SKIPPED], posts)):
        a = tok(answer, add_special_tokens=False)["input_ids"]
        p = tok(post, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        samples.append(Sample(0, ex, prompt, a + p, "eos", [-0.5] * (len(a) + len(p)), 0, answer_end=len(a)))
    return samples


POSTS = [pcl_evaluation_text(1, 1), pcl_evaluation_text(1, 1),        # honest; overconfident
         " <evaluation> ok </evaluation> <reward> [1] </reward>",      # wrong length: consistency 0
         " <evaluation> no reward block"]                               # malformed: format 0, consistency 0


def test_rewards_accuracy_format_consistency():
    policy, tok = tiny_policy()
    obj = PCL(config(objective="pcl"), tok)
    samples = pcl_samples(tok, POSTS)
    ctx = context(policy)
    r = obj.score(samples, ctx)
    # accuracy + full format + consistency, by hand:
    assert r.tolist() == pytest.approx([1 + 1 + 1, 0 + 1 + 0.5, 1 + 1 + 0, 0 + 0 + 0])
    assert ctx.metrics["pcl_parsed_frac"][:2] == (3.0, 4.0)


@pytest.mark.parametrize("form", ["prob", "mean_prob"])
def test_verifree_accuracy_is_the_reference_probability(form):
    """pcl_accuracy verifree: the accuracy reward is sum_k w_k pi(y*_k | x, z) of the
    answer part (mean_prob: the mean per-token probability of the reference)."""
    from pyvf.verify.verifree import verifree_scores

    policy, tok = tiny_policy()
    cfg = config(objective="pcl", pcl_accuracy="verifree", pcl_reward_form=form)
    obj = PCL(cfg, tok)
    samples = pcl_samples(tok, POSTS)
    ctx = context(policy)
    obj.score(samples, ctx)
    acc = [s.scored["pcl_truth"][0] for s in samples]
    want = verifree_scores(policy, tok, [s.prompt_ids for s in samples], [s.ids[:s.answer_end] for s in samples],
                           [s.example.answers for s in samples], [s.example.weights for s in samples],
                           temperature=ctx.temperature, device=ctx.device, marker=cfg.marker, answer_template=cfg.answer_template, max_seq_len=cfg.max_seq_len,
                           token_budget=cfg.micro_batch_tokens, reward_form=form)
    assert acc == pytest.approx(want.tolist())
    assert 0 < acc[1] < acc[0] < 1  # the skipped step makes the reference less likely


def test_sequences_and_masks():
    """Which rows get which loss: the sampled completion (all of it) the policy gradient,
    its answer part also SFT x accuracy; a second sequence (answer part as context, the
    evaluation from the true rewards + EOS) SFT on the evaluation rows only."""
    policy, tok = tiny_policy()
    obj = PCL(config(objective="pcl", pcl_sft_answer=0.25, pcl_sft_evaluation=0.5), tok)
    samples = pcl_samples(tok, POSTS)
    ctx = context(policy)
    rewards = obj.score(samples, ctx)
    ts = obj.sequences(samples)
    assert ts.owner == [0, 0, 1, 1, 2, 2, 3, 3]
    taught = ts.sequences[3]
    assert tok.decode(taught.prompt_ids[len(samples[1].prompt_ids):]) == SKIPPED
    assert tok.decode(taught.post_ids[:-1]) == pcl_evaluation_text(0, 1) and taught.post_ids[-1] == tok.eos_token_id
    assert ts.sampled_prefix == [len(samples[0].ids), 0, len(samples[1].ids), 0, len(samples[2].ids), 0,
                                 len(samples[3].ids), 0]
    from pyvf.ops import grouped_advantages

    ctx.advantages = grouped_advantages(rewards.float(), torch.zeros(4, dtype=torch.long), estimator="grpo",
                                        eps=1e-4)
    ctx.samples = samples
    mb = ts.micro_batch(list(range(len(ts.sequences))), torch.device("cpu"))
    c, e = obj.coefficients(mb, None, ctx)
    assert e is None
    starts = mb.batch.cu_seqlens.tolist()
    for b, (seq, i) in enumerate(zip(ts.sequences, ts.owner)):
        rows = c[starts[b]:starts[b + 1]]
        roles = mb.batch.roles[starts[b]:starts[b + 1]]
        first = len(seq.prompt_ids) - 1
        a = float(ctx.advantages[i])
        if b % 2 == 0:  # sampled: -A everywhere, minus 0.25 x accuracy on the answer part
            n_answer = samples[i].answer_end
            acc = 1.0 if i in (0, 2) else 0.0
            assert torch.allclose(rows[first:first + n_answer], torch.full((n_answer,), -a - 0.25 * acc,
                                                                             dtype=rows.dtype))
            assert torch.allclose(rows[first + n_answer:-1], torch.full_like(rows[first + n_answer:-1], -a))
            assert torch.all(roles[first:-1] == ROLE_REASONING)
        else:  # taught evaluation: -0.5 on its rows, nothing on the context
            assert torch.all(rows[first:-1] == -0.5) and torch.all(roles[first:-1] == ROLE_POST)
            assert torch.all(rows[:first] == 0)


@pytest.mark.parametrize("lm_head_pass", ["fused", "autograd", "full_logits"])
def test_gradient_is_grpo_plus_both_sft_terms(lm_head_pass):
    """The step's gradient equals autograd through the loss written out: token mean over
    every trained row of -(A lp) on the sampled rows, -(w1 acc lp) on the answer part,
    -(w2 lp) on the taught evaluation (rft_trainer.py compute_loss, with pyvf's SFT
    targets)."""
    policy, tok = tiny_policy(lm_head_pass)
    cfg = config(objective="pcl")
    obj = PCL(cfg, tok)
    samples = pcl_samples(tok, POSTS)
    ctx = context(policy)
    rewards = obj.score(samples, ctx)
    accumulate_gradients(cfg, obj, "token_mean", policy, samples, rewards, ctx)
    got = grads(policy)

    policy.zero_grad(set_to_none=True)
    ts = obj.sequences(samples)
    batch = pack(ts.sequences)
    logp = policy(batch).double()
    from pyvf.ops import grouped_advantages

    adv = grouped_advantages(rewards.float(), torch.zeros(4, dtype=torch.long), estimator="grpo", eps=1e-4).double()
    loss = torch.zeros((), dtype=torch.float64)
    starts = batch.cu_seqlens.tolist()
    for b, (seq, i) in enumerate(zip(ts.sequences, ts.owner)):
        first = starts[b] + len(seq.prompt_ids) - 1
        if b % 2 == 0:
            lp = logp[first:first + len(samples[i].ids)]
            acc = samples[i].scored["pcl_truth"][0]
            loss = loss - adv[i] * lp.sum() - 0.1 * acc * lp[:samples[i].answer_end].sum()
        else:
            loss = loss - 0.1 * logp[first:first + len(seq.post_ids)].sum()
    (loss / (batch.targets != batch.ignore_index).sum()).backward()
    want = grads(policy)
    assert torch.linalg.norm(got - want) / torch.linalg.norm(want) < 1e-5


class FakeEngine:
    def __init__(self, tok):
        self.tok, self.calls = tok, []

    def generate(self, prompts, n, **kw):
        self.calls.append((prompts, n, kw))
        ids = self.tok(" <evaluation> x </evaluation> <reward> [1, 1] </reward>", add_special_tokens=False)["input_ids"]
        return [[Completion(ids + [self.tok.eos_token_id], "eos", [-0.25] * (len(ids) + 1))] for _ in prompts]


def test_continue_rollout_samples_on_after_the_answer_only():
    """Completions a stop string ended (the answer) get sampled on with EOS forbidden at
    first; those that ended at EOS or the length limit are left as they are."""
    _, tok = tiny_policy()
    obj = PCL(config(objective="pcl", pcl_evaluation_tokens=20), tok)
    base = pcl_samples(tok, POSTS)
    samples = [Sample(s.example_index, s.example, s.prompt_ids, s.ids[:s.answer_end], f, [-0.5] * s.answer_end,
                      s.group, policy_version=1, engine_on_policy=False)
               for s, f in zip(base, ["stop", "eos", "length", "stop"])]
    engine = FakeEngine(tok)
    out = obj.continue_rollout(samples, engine, context(None, step=3))
    (prompts, n, kw), = engine.calls
    assert n == 1 and kw["min_new_tokens"] == 1 and kw["stop"] == () and kw["max_new_tokens"] == 20
    assert prompts == [samples[0].prompt_ids + samples[0].ids, samples[3].prompt_ids + samples[3].ids]
    for k in (0, 3):
        assert out[k].answer_end == len(samples[k].ids) and out[k].ids[:out[k].answer_end] == samples[k].ids
        assert out[k].finish == "eos" and out[k].rollout_logprobs[-1] == -0.25
        assert len(out[k].rollout_logprobs) == len(out[k].ids)
        # sampled (in part) by version 1 with another engine's numerics: step 3 weights its tokens
        assert out[k].policy_version == 1 and not out[k].behaviour_is_current(3)
    assert out[1] is samples[1] and out[2] is samples[2] and out[1].answer_end is None
    # The seeds depend on (seed, step, group, sample in group), not on the batch or the
    # rank: another group's samples in front (as on one process) change nothing.
    other = [Sample(s.example_index, s.example, s.prompt_ids, s.ids, "stop", s.rollout_logprobs, 7) for s in samples]
    again = FakeEngine(tok)
    obj.continue_rollout(other + samples, again, context(None, step=3))
    assert again.calls[0][2]["seeds"][-2:] == kw["seeds"] and kw["seeds"][0] != kw["seeds"][1]


def test_served_pcl_model_stops_at_the_answer(tmp_path):
    """`pyvf eval` with the PCL prompt on the shipped model (whose warm-up taught the
    PCL format): no completion goes past </answer>; without the stop the same model
    goes on to evaluate itself, so the stop is what saves the tokens."""
    import json

    from pyvf.cli import main as cli

    for stop, out in (("</answer>", "served.json"), ("", "unstopped.json")):
        assert cli(["eval", "--prompt-template", PCL_PROMPT_TEMPLATE, "--limit", "8", "--stop", stop,
                    "--output", str(tmp_path / out)]) == 0
    served = json.loads((tmp_path / "served.json").read_text())["results"][0]["details"]
    unstopped = json.loads((tmp_path / "unstopped.json").read_text())["results"][0]["details"]
    assert all(d["completions"][0].rstrip().endswith("</answer>") and "<evaluation>" not in d["completions"][0]
               for d in served)
    assert sum("<evaluation>" in d["completions"][0] for d in unstopped) >= 6
    assert [d["predictions"] for d in served] == [d["predictions"] for d in unstopped]
