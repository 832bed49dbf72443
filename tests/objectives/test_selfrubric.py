"""Self-rated rubric reward: the ranking term and its sign, the ranking agreement, the
rewards read from planted completions (self) and from a rater copy, and a `reward`
verifier added to any objective's reward."""

import pytest
import torch
from helpers import config, context, tiny_policy

from pyvf.data.dataset import Example
from pyvf.objectives.base import Sample
from pyvf.objectives.selfrubric import SelfRubric, ranking_agreement, ranking_term


def test_ranking_term_sign():
    """(wins - losses) / (G - 1): the best of a group +1, the worst -1, ties 0; groups apart."""
    r = torch.tensor([0.9, 0.5, 0.5, 0.1, 0.7, 0.7], dtype=torch.float64)
    g = torch.tensor([0, 0, 0, 0, 1, 1])
    assert ranking_term(r, g).tolist() == pytest.approx([1.0, 0.0, 0.0, -1.0, 0.0, 0.0])
    assert ranking_term(torch.tensor([0.3], dtype=torch.float64), torch.tensor([5])).tolist() == [0.0]
    # Rating everyone 5 earns no ranking term: flattery gains nothing over honesty.
    assert torch.all(ranking_term(torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.long)) == 0)
    with pytest.raises(ValueError, match="same length"):
        ranking_term(torch.ones(3), torch.zeros(2, dtype=torch.long))


def test_ranking_agreement():
    g = torch.tensor([0, 0, 0, 1, 1])
    truth = torch.tensor([0.2, 0.5, 0.9, 0.4, 0.4], dtype=torch.float64)   # group 1: equal truths, no pair
    same = ranking_agreement(truth.clone(), truth, g)
    assert same == (3.0, 3)
    reversed_ = ranking_agreement(-truth, truth, g)
    assert reversed_ == (0.0, 3)
    tied = ranking_agreement(torch.zeros(5, dtype=torch.float64), truth, g)
    assert tied == (1.5, 3)


STORY = " Once, Ada had 3 marbles. Then the marbles rolled away. In the end, Ada found them."
GOOD = "<rating>structure: 5; descriptive: 5; person: 5; tone: 3; words: 5</rating>"
LOW = "<rating>structure: 1; descriptive: 1; person: 1; tone: 1; words: 1</rating>"


def samples_of(tok, completions):
    prompt = tok("Task: Write a short story about Ada and the marbles.\nWrite the story, then rate it.\nStory:",
                 add_special_tokens=False)["input_ids"]
    ex = Example("Write a short story about Ada and the marbles.", (), ())
    return [Sample(0, ex, prompt, tok(c, add_special_tokens=False)["input_ids"], "eos", None, k // 2)
            for k, c in enumerate(completions)]


def test_self_ratings_are_the_reward_with_the_ranking_term():
    policy, tok = tiny_policy()
    obj = SelfRubric(config(objective="selfrubric", data="openended", ranking_weight=0.5), tok)
    obj.attach(policy)
    completions = [STORY + "\n" + GOOD, STORY + "\n" + LOW, STORY + "\n<rating>structure: 9</rating>", STORY]
    ctx = context(policy)
    r = obj.score(samples_of(tok, completions), ctx)
    good = obj.rubric.score({"structure": 5, "descriptive": 5, "person": 5, "tone": 3, "words": 5})
    # group 0: good vs low rating -> +-0.5 ranking; group 1: both unparsable -> 0, tie
    assert r.tolist() == pytest.approx([good + 0.5, 0.0 - 0.5, 0.0, 0.0])
    assert ctx.metrics["rating_unparsable_frac"][:2] == (2.0, 4.0)
    assert ctx.metrics["rating_mean"][0] == pytest.approx(good)
    # the built-in task's true rating: the same story everywhere, so no pair to rank
    assert ctx.metrics["ranking_agreement"][1] == 0


def test_frozen_rater_rates_by_continuing_prompt_and_answer():
    """rater frozen: the ratings come from a copy's continuation of prompt + story + newline,
    whatever the policy wrote as its own rating."""
    policy, tok = tiny_policy()
    obj = SelfRubric(config(objective="selfrubric", data="openended", rater="frozen"), tok)
    obj.attach(policy)
    seen = []

    def fake_rate(asks):
        seen.extend(asks)
        return [GOOD, LOW]

    obj.verifier.rate = fake_rate
    samples = samples_of(tok, [STORY + "\n" + LOW, STORY + "\n" + GOOD])
    r = obj.score(samples, context(policy))
    assert r[0] > r[1]
    prompt = tok.decode(samples[0].prompt_ids)
    assert seen == [prompt + STORY + "\n"] * 2  # the rater continues prompt + story, never the policy's rating
    assert obj.rater is not None and all(not p.requires_grad for p in obj.rater.parameters())
    assert obj.state_dict() == {}  # a frozen rater is the starting model: nothing to save


def test_proxy_rater_moves_toward_the_policy_and_is_saved():
    policy, tok = tiny_policy()
    obj = SelfRubric(config(objective="selfrubric", data="openended", rater="proxy", proxy_alpha=0.5), tok)
    obj.attach(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in obj.rater.state_dict().items()}
    obj._sync_rater(context(policy))
    name = "model.embed_tokens.weight"
    assert torch.allclose(obj.rater.state_dict()[name], before[name] + 0.5)
    other = SelfRubric(config(objective="selfrubric", data="openended", rater="proxy"), tok)
    other.attach(tiny_policy()[0])
    other.load_state_dict(obj.state_dict())
    assert torch.equal(other.rater.state_dict()[name], obj.rater.state_dict()[name])


def test_extra_reward_moves_verifree_advantages():
    """`reward`: another verifier's score adds to VeriFree's R_i before the RLOO advantages."""
    from pyvf.objectives.verifree import verifree_coefficients
    from pyvf.packing import ROLE_ANSWER, ROLE_REASONING

    roles = torch.tensor([ROLE_REASONING, ROLE_ANSWER] * 4)
    cu = torch.arange(0, 9, 2)
    lp = torch.full((8,), -0.5, dtype=torch.float64)
    groups = torch.zeros(4, dtype=torch.long)
    base = verifree_coefficients(lp, roles, cu, groups)
    assert torch.allclose(base.advantages, torch.zeros(4, dtype=base.advantages.dtype))
    more = verifree_coefficients(lp, roles, cu, groups, extra_rewards=torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert more.advantages[0] == pytest.approx(1.0) and more.advantages[1] == pytest.approx(-1 / 3)
    assert torch.allclose(more.coeffs[1::2], base.coeffs[1::2])  # the answer term keeps the probability


def test_rubric_objective_needs_no_references_and_others_do(tmp_path, capsys):
    from pyvf.cli import main as cli

    assert cli(["train", "--objective", "verifier", "--data", "openended", "--max-steps", "1",
                "--output-dir", str(tmp_path / "x")]) == 2
    assert "needs a reference answer" in capsys.readouterr().err
