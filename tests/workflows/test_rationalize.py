"""`pyvf rationalize` (RAVR): the leak filter on planted leaks of both kinds (honest
derivations kept), the scoring of planted rationales after the plain prompt, and a
tiny end-to-end run on the shipped model through the command line."""

import json

import pytest
import torch

from pyvf.data import synthetic
from pyvf.data.dataset import Example
from pyvf.runtime.rollout import Completion
from pyvf.workflows.rationalize import counts_path, leak_reason, rationalize, split_steps

REFS = ["4/5", "0.8"]
QUESTION = ("A jug holds 3 liters of tea and 10 more liters are added. 9 liters spill, and the rest is poured "
            "equally into 5 bottles. How many liters are in each bottle?")
HONEST = " 3 + 10 = 13. 13 - 9 = 4. 4 / 5 = 4/5. "
FORCED = " 3 + 10 = 13. 13 / 5 = 13/5. "   # the skipped step; the reference is then asserted


def test_split_steps_keeps_decimals_whole():
    assert split_steps(" 3 + 10 = 13. 13 - 9 = 4. 4 / 5 = 0.8. ") == ["3 + 10 = 13.", "13 - 9 = 4.", "4 / 5 = 0.8."]
    assert split_steps("Is it 2? Yes! It is 2.5") == ["Is it 2?", "Yes!", "It is 2.5"]


@pytest.mark.parametrize("text", [
    " The reference answer is 4/5. 3 + 10 = 13. 13 - 9 = 4. 4 / 5 = 4/5. ",   # the warm-up's leaking kind
    " 3 + 10 = 13. 13 - 9 = 4. 4 / 5 = 4/5, which matches the given answer. ",
    " I was told the result, so 3 + 10 = 13. 13 - 9 = 4. 4 / 5 = 4/5. ",
    " I already know the answer is 4/5. 3 + 10 = 13. ",
    " Working backwards from the answer: 4 * 5 = 20. ",
    " The REFERENCE says so. 13 - 9 = 4. ",
    " Since the expected answer is 0.8, 3 + 10 = 13. ",
])
def test_mentions_of_the_reference_are_leaks(text):
    assert leak_reason(text, REFS, question=QUESTION) == "mentions"


@pytest.mark.parametrize("text", [
    " The answer is 4/5. 3 + 10 = 13. 13 - 9 = 4. 4 / 5 = 4/5. ",        # stated first
    " So each bottle gets 0.8. 3 + 10 = 13. 13 - 9 = 4. 4 / 5 = 4/5. ",   # an equivalent form
    " 3 + 10 = 13. It must come to \\frac{4}{5}. 13 - 9 = 4. 4 / 5 = 4/5. ",  # LaTeX form
    " 3 + 10 = 13. 0.80 per bottle! 4 / 5 = 4/5. ",                      # another spelling of 0.8
])
def test_references_stated_before_the_last_step_are_leaks(text):
    assert leak_reason(text, REFS, question=QUESTION) == "early"


@pytest.mark.parametrize("text", [
    HONEST,
    FORCED,
    " 3 + 10 = 13. 13 - 9 = 4. So each bottle gets 4 / 5 = 0.8. ",   # reference in the last step only
    " 3 + 10 = 13. 13 - 9 = 4. 4 / 5 = 4/5",                        # no final period
    " Let me think. 3 + 10 = 13, and 9 spill. 13 - 9 = 4. 4 / 5 = 4/5. ",
    "",
])
def test_honest_rationales_are_kept(text):
    assert leak_reason(text, REFS, question=QUESTION) is None


def test_numbers_of_the_question_are_not_leaks():
    """The answer 5 is also a number of the question: restating it early is allowed;
    without the question it counts (the documented false positive)."""
    question = "Ada has 15 coins and gives away 5, then packs the rest into 2 boxes. How many go in each box?"
    text = " There are 5 given away. 15 - 5 = 10. 10 / 2 = 5. "
    assert leak_reason(text, ["5"], question=question) is None
    assert leak_reason(text, ["5"]) == "early"


def test_textual_references_and_bad_input():
    assert leak_reason(" It is Paris. The capital of France is Paris. ", ["Paris"]) == "early"
    assert leak_reason(" France's capital. It is Paris. ", ["Paris"]) is None
    assert leak_reason(" Comparison aside. It is Paris. ", ["Paris"]) is None  # not a whole word
    with pytest.raises(ValueError, match="references"):
        leak_reason(HONEST, [" "])


def test_the_warm_up_styles_on_many_questions():
    """The shipped model's warm-up writes honest, forced and leaking rationales
    (pyvf.assets.build_model.rationale_text): no honest or forced one is flagged, every
    leaking one is."""
    for p in synthetic.generate(300, seed=1):
        honest = p.completion.split("<answer")[0]
        forced = f" {p.shortcut} "
        leak = f" The reference answer is {p.answers[0]}. {p.solution} "
        assert leak_reason(honest, p.answers, question=p.question) is None, p.question
        assert leak_reason(forced, p.answers, question=p.question) is None, p.question
        assert leak_reason(leak, p.answers, question=p.question) == "mentions"


class PlantedEngine:
    """A rollout engine that returns planted texts, sample j of every prompt the j-th text."""

    name = "planted"

    def __init__(self, tokenizer, texts):
        self.tokenizer, self.texts, self.prompts = tokenizer, texts, []

    def generate(self, prompts, n, **kw):
        self.prompts += [self.tokenizer.decode(p) for p in prompts]
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in self.texts[:n]]
        return [[Completion(list(x), "stop", [0.0] * len(x)) for x in ids] for _ in prompts]


@pytest.fixture(scope="module")
def shipped():
    from pyvf.runtime.model import load_model_and_tokenizer

    return load_model_and_tokenizer("builtin")


def test_planted_rationales_are_filtered_scored_without_the_reference_and_the_best_kept(shipped):
    from pyvf.runtime.policy import Policy
    from pyvf.train.config import TrainConfig
    from pyvf.verify.verifree import verifree_scores

    model, tok = shipped
    answer = "<answer> \\boxed{4/5} </answer>"
    texts = [FORCED + answer, " The reference answer is 4/5. 3 + 10 = 13. " + answer, HONEST + answer,
             " 3 + 10 = 13. 13 - 9", " So 0.8 it is. 13 - 9 = 4. 4 / 5 = 4/5. " + answer]
    engine = PlantedEngine(tok, texts)
    ex = Example(QUESTION, tuple(REFS), (0.5, 0.5))
    rows, counts = rationalize(model, tok, [ex, ex], samples=len(texts), engine=engine, batch_size=1)
    # the rationale prompt shows the reference; every sample is scored or dropped once
    assert all("Reference answer: 4/5" in p for p in engine.prompts)
    assert counts == dict(questions=2, samples=10, scored=4, leak_mentions=2, leak_early=2, no_marker=2,
                          questions_without_rationale=0, rows=2)
    row = rows[0]
    assert row["rationale"] == HONEST and row["completion"] == HONEST + answer
    assert row["answer"] == REFS and row["candidates"] == 2
    # the score is pi(reference | plain prompt, rationale): the reference absent from the prompt
    plain = tok(synthetic.PROMPT_TEMPLATE.format(question=QUESTION), add_special_tokens=False)["input_ids"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in (FORCED + answer, HONEST + answer)]
    cfg = TrainConfig()
    want = verifree_scores(Policy(model), tok, [plain, plain], ids, [REFS, REFS], [[0.5, 0.5]] * 2, temperature=1.0,
                           device=torch.device("cpu"), marker=cfg.marker, answer_template=cfg.answer_template,
                           max_seq_len=512, token_budget=4096)
    assert row["score"] == pytest.approx(want[1].item(), rel=1e-9)
    assert 0 < want[0] < want[1]  # the forced rationale makes the reference less likely
    # a slip early on: the score cannot tell (the answer follows from the last step), the plausibility can
    slip = " 3 + 10 = 14. 13 - 9 = 4. 4 / 5 = 4/5. "
    rows, _ = rationalize(model, tok, [ex], samples=2, engine=PlantedEngine(tok, [slip + answer, HONEST + answer]))
    assert rows[0]["rationale"] == HONEST and rows[0]["plausibility"] < 1
    rows, _ = rationalize(model, tok, [ex], samples=2, engine=PlantedEngine(tok, [slip + answer, HONEST + answer]),
                          select="score")
    assert rows[0]["plausibility"] == 1.0
    with pytest.raises(ValueError, match="select must be one of"):
        rationalize(model, tok, [ex], samples=2, engine=PlantedEngine(tok, [HONEST]), select="best")
    # a floor on the score keeps no row
    rows, counts = rationalize(model, tok, [ex], samples=len(texts), engine=PlantedEngine(tok, texts),
                               min_score=1.01)
    assert rows == [] and counts["questions_without_rationale"] == 1 and counts["rows"] == 0


def test_rationalize_command_on_the_shipped_model(tmp_path):
    from pyvf.cli import main

    out = tmp_path / "rationales.jsonl"
    assert main(["rationalize", "--limit", "3", "--samples", "2", "--max-new-tokens", "40", "--output",
                 str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    counts = json.loads(counts_path(out).read_text())
    assert counts["questions"] == 3 and counts["samples"] == 6
    assert counts["samples"] == counts["scored"] + counts["leak_mentions"] + counts["leak_early"] + counts["no_marker"]
    assert counts["rows"] == len(rows) == 3 - counts["questions_without_rationale"]
    for row in rows:
        assert set(row) == {"question", "answer", "rationale", "completion", "score", "plausibility", "candidates"}
        assert row["completion"] == row["rationale"] + f"<answer> \\boxed{{{row['answer'][0]}}} </answer>"
        assert 0 <= row["score"] <= 1 and 1 <= row["candidates"] <= 2
    assert main(["rationalize", "--data", "openended", "--output", str(out)]) == 2
    assert main(["rationalize", "--samples", "0", "--output", str(out)]) == 2
