"""`pyvf sft`: only the completion and EOS tokens are trained, the loss is their mean
negative log-likelihood and falls, the worked-solution baseline rows, and the saved
model directory loads and evaluates."""

import json

import pytest
import torch

from pyvf.data import synthetic
from pyvf.data.dataset import synthetic_examples
from pyvf.packing import IGNORE_INDEX, pack
from pyvf.workflows.sft import lr_factor, read_rows, sft, sft_loss, sft_sequence, worked_solution_rows

# A habit the shipped model does not have: a sentence before the arithmetic.
NEW_HABIT = " Let me work it out step by step."


@pytest.fixture()
def shipped():
    from pyvf.runtime.model import load_model_and_tokenizer

    return load_model_and_tokenizer("builtin")


def rows_with_habit(n):
    """Training-split questions with a completion in a new style."""
    return [{"question": p.question, "completion": NEW_HABIT + p.completion}
            for p in synthetic.generate(n, seed=1)]


def test_only_the_completion_and_eos_are_targets(shipped):
    _, tok = shipped
    question, completion = "What is 2 + 3?", " 2 + 3 = 5. <answer> \\boxed{5} </answer>"
    seq = sft_sequence(tok, question, completion, tok.eos_token_id)
    prompt = tok(synthetic.PROMPT_TEMPLATE.format(question=question), add_special_tokens=False)["input_ids"]
    completion_ids = tok(completion, add_special_tokens=False)["input_ids"]
    assert seq.prompt_ids == prompt and seq.reasoning_ids == completion_ids + [tok.eos_token_id]
    batch = pack([seq])
    trained = batch.targets != IGNORE_INDEX
    # row t predicts token t + 1: the rows from the prompt's last token on, up to the EOS
    assert trained.nonzero().flatten().tolist() == list(range(len(prompt) - 1, len(seq) - 1))
    assert batch.targets[trained].tolist() == completion_ids + [tok.eos_token_id]


def test_loss_is_the_mean_nll_of_the_completion_tokens(shipped):
    from pyvf.runtime.policy import Policy

    model, tok = shipped
    rows = rows_with_habit(3)
    seqs = [sft_sequence(tok, r["question"], r["completion"], tok.eos_token_id) for r in rows]
    loss, n_tokens = sft_loss(Policy(model, lm_head_pass="autograd"), seqs)
    total, count = 0.0, 0
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s.ids()])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            start = len(s.prompt_ids)
            for t in range(start, len(s)):
                total -= logp[t - 1, ids[0, t]].item()
                count += 1
    assert n_tokens == count
    assert loss.item() == pytest.approx(total / count, rel=1e-4)


def test_training_lowers_the_loss(shipped):
    from pyvf.runtime.policy import Policy

    model, tok = shipped
    rows = rows_with_habit(6)
    seqs = [sft_sequence(tok, r["question"], r["completion"], tok.eos_token_id) for r in rows]
    policy = Policy(model, lm_head_pass="autograd")
    with torch.no_grad():
        before = sft_loss(policy, seqs)[0].item()
    losses = sft(model, tok, rows, steps=8, lr=1e-3, batch_size=3, seed=0)
    with torch.no_grad():
        after = sft_loss(policy, seqs)[0].item()
    assert len(losses) == 8
    assert after < 0.7 * before, (before, after)


def test_seeded_runs_repeat(shipped):
    from pyvf.runtime.model import load_model_and_tokenizer

    model, tok = shipped
    rows = rows_with_habit(6)
    a = sft(model, tok, rows, steps=3, lr=1e-3, batch_size=2, seed=3)
    model2, _ = load_model_and_tokenizer("builtin")
    b = sft(model2, tok, rows, steps=3, lr=1e-3, batch_size=2, seed=3)
    assert a == b


def test_lr_schedule():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(99, 100, 10) < 0.01


def test_worked_solution_rows_and_bad_rows(tmp_path):
    questions = [ex.question for ex in synthetic_examples(5, seed=1)][::-1]
    rows = worked_solution_rows(questions, search=10)
    by_question = {p.question: p for p in synthetic.generate(5, seed=1)}
    assert [r["question"] for r in rows] == questions
    assert all(r["completion"] == by_question[r["question"]].completion for r in rows)
    with pytest.raises(ValueError, match="not questions of the synthetic task"):
        worked_solution_rows(["What is the capital of France?"], search=10)
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "completion": "c"}\n{"question": "q"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: needs a non-empty string 'completion'"):
        read_rows(path)
    path.write_text("not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: not a JSON object"):
        read_rows(path)


def test_sft_command_writes_a_model_that_loads_and_evaluates(tmp_path, shipped):
    from pyvf.cli import main
    from pyvf.runtime.model import load_model_and_tokenizer
    from pyvf.workflows.evaluate import evaluate

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows_with_habit(6)))
    out = tmp_path / "model"
    assert main(["sft", "--data", str(data), "--steps", "2", "--batch-size", "3", "--lr", "1e-4",
                 "--output-dir", str(out)]) == 0
    model, tok = load_model_and_tokenizer(str(out))
    record = json.loads((out / "sft.json").read_text())
    assert record["rows"] == 6 and record["steps"] == 2 and record["train_on"] == "completion"
    result = evaluate(model, tok, synthetic_examples(2, seed=2), max_new_tokens=8)
    assert result["n"] == 2
    # the baseline: the worked solutions of the same questions
    assert main(["sft", "--data", str(data), "--train-on", "worked", "--steps", "1", "--output-dir",
                 str(tmp_path / "plain")]) == 0
    assert json.loads((tmp_path / "plain" / "sft.json").read_text())["train_on"] == "worked"
    assert main(["sft", "--data", str(data), "--steps", "0", "--output-dir", str(out)]) == 2
