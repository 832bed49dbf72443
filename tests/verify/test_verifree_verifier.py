"""The verifree verifier against pi(answer | prompt, reasoning) computed directly: one
plain forward of the shipped tiny model over prompt + reasoning through the marker +
the rendered answer, log_softmax, the answer tokens' log-probs summed."""

import math

import pytest
import torch

from pyvf.data.synthetic import PROMPT_TEMPLATE
from pyvf.runtime.model import load_model_and_tokenizer
from pyvf.runtime.policy import Policy
from pyvf.train.config import TrainConfig
from pyvf.verify import VerifreeVerifier, get_verifier

QUESTION = ("A jug holds 3 liters of tea and 10 more liters are added. 9 liters spill, and the rest is poured "
            "equally into 5 bottles. How many liters are in each bottle?")
PROMPT = PROMPT_TEMPLATE.format(question=QUESTION)
RIGHT = " 3 + 10 = 13. 13 - 9 = 4. 4 / 5 = 4/5. <answer> \\boxed{4/5} </answer>"
SKIPPED = " 3 + 10 = 13. 13 / 5 = 13/5. <answer> \\boxed{13/5} </answer> trailing text"
NO_MARKER = " 3 + 10 = 13. 13 - 9"


@pytest.fixture(scope="module")
def model_and_tokenizer():
    model, tok = load_model_and_tokenizer("builtin")
    model.eval()
    return model, tok


def direct(model, tok, prompt, completion, reference):
    """log pi(answer | prompt, reasoning) with the reasoning cut after the marker."""
    cfg = TrainConfig()
    cut = completion.index(cfg.marker) + len(cfg.marker)
    ids = [tok(prompt, add_special_tokens=False)["input_ids"], tok(completion[:cut], add_special_tokens=False)[
        "input_ids"], tok(cfg.answer_template.format(ref=reference), add_special_tokens=False)["input_ids"]]
    full = torch.tensor([ids[0] + ids[1] + ids[2]])
    with torch.no_grad():
        logp = torch.log_softmax(model(full).logits[0].double(), -1)
    start = len(ids[0]) + len(ids[1])
    return sum(logp[t - 1, full[0, t]].item() for t in range(start, full.shape[1]))


def test_matches_direct_computation(model_and_tokenizer):
    model, tok = model_and_tokenizer
    v = get_verifier("verifree", model=model, tokenizer=tok)
    scores = v([PROMPT] * 3, [RIGHT, SKIPPED, NO_MARKER], [["4/5", "0.8"]] * 3)
    want = [0.5 * (math.exp(direct(model, tok, PROMPT, c, "4/5")) + math.exp(direct(model, tok, PROMPT, c, "0.8")))
            for c in (RIGHT, SKIPPED)]
    assert scores[0] == pytest.approx(want[0], rel=1e-4)
    assert scores[1] == pytest.approx(want[1], rel=1e-4, abs=1e-12)
    assert scores[2] == 0.0
    # The shipped model is warmed up on this task: the right reasoning makes the
    # reference far likelier than the skipped step does.
    assert scores[0] > 100 * scores[1] and 0 < scores[0] <= 1
    assert v.stats == {"no_marker": 1, "scored": 3}


def test_single_reference_and_policy_wrapper_agree(model_and_tokenizer):
    model, tok = model_and_tokenizer
    by_model = VerifreeVerifier(model, tok)([PROMPT], [RIGHT], [["4/5"]])
    by_policy = VerifreeVerifier(policy=Policy(model), tokenizer=tok)([PROMPT], [RIGHT], [["4/5"]])
    assert by_model == pytest.approx(by_policy)
    assert by_model[0] == pytest.approx(math.exp(direct(model, tok, PROMPT, RIGHT, "4/5")), rel=1e-4)


def test_temperature_and_length_limit(model_and_tokenizer):
    model, tok = model_and_tokenizer
    hot = VerifreeVerifier(model, tok, temperature=2.0)([PROMPT], [RIGHT], [["4/5"]])[0]
    cold = VerifreeVerifier(model, tok)([PROMPT], [RIGHT], [["4/5"]])[0]
    assert hot < cold  # a peaked answer distribution flattens at a higher temperature
    n_prompt = len(tok(PROMPT, add_special_tokens=False)["input_ids"])
    short = VerifreeVerifier(model, tok, max_seq_len=n_prompt + 5)
    assert short([PROMPT], [RIGHT], [["4/5", "0.8"]]) == [0.0]
    assert short.stats == {"too_long": 2, "scored": 1}


def test_argument_errors(model_and_tokenizer):
    model, tok = model_and_tokenizer
    v = VerifreeVerifier(model, tok)
    with pytest.raises(ValueError, match="references: the verifree verifier scores against reference answers"):
        v([PROMPT], [RIGHT])
    with pytest.raises(ValueError, match=r"prompts\[0\] is empty"):
        v([""], [RIGHT], [["4/5"]])
    with pytest.raises(ValueError, match="tokenizer"):
        VerifreeVerifier(model)
    with pytest.raises(ValueError, match="not both or neither"):
        VerifreeVerifier(model, tok, policy=Policy(model))
    with pytest.raises(ValueError, match="answer_template must contain"):
        VerifreeVerifier(model, tok, answer_template="no placeholder")
    with pytest.raises(ValueError, match="temperature"):
        VerifreeVerifier(model, tok, temperature=0)


def test_reward_forms_of_the_verifier():
    """reward_form: logprob is the log of prob for a completion with the marker and one
    reference; mean_logprob divides it by the answer's tokens; the log forms score a
    completion without the marker (the marker appended) where prob gives 0."""
    model, tok = load_model_and_tokenizer("builtin")
    prompt = "Q: 2 + 2?"
    completions = [" 2 + 2 = 4. <answer> \\boxed{4} </answer>", " 2 + 2 = 4."]
    scores = {form: VerifreeVerifier(model, tok, reward_form=form)([prompt] * 2, completions, [["4"], ["4"]])
              for form in ("prob", "logprob", "mean_logprob", "mean_prob")}
    assert scores["prob"][1] == 0.0 and scores["mean_prob"][1] == 0.0
    assert math.isfinite(scores["logprob"][1]) and scores["logprob"][1] < 0
    assert scores["logprob"][0] == pytest.approx(math.log(scores["prob"][0]), rel=1e-6)
    assert scores["logprob"][0] < scores["mean_logprob"][0] < 0
    assert 0 < scores["mean_prob"][0] < 1
    with pytest.raises(ValueError, match="reward_form must be one of"):
        VerifreeVerifier(model, tok, reward_form="odds")
