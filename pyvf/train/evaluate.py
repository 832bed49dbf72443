"""Greedy evaluation: the last \\boxed{...} of each completion, compared with every
reference after normalization (8/5 == 1.6)."""

from __future__ import annotations

from pyvf.data.answers import is_equivalent, last_boxed
from pyvf.data.dataset import Example
from pyvf.data.synthetic import PROMPT_TEMPLATE
from pyvf.train.rollout import greedy


def evaluate(model, tokenizer, examples: list[Example], *, max_new_tokens: int = 64,
             prompt_template: str = "", batch_size: int = 64) -> dict:
    template = prompt_template or PROMPT_TEMPLATE
    prompts = [tokenizer(template.format(question=ex.question), add_special_tokens=False)["input_ids"]
               for ex in examples]
    outputs = greedy(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size)
    details = []
    for ex, out in zip(examples, outputs):
        text = tokenizer.decode(out, skip_special_tokens=True)
        pred = last_boxed(text)
        details.append({"question": ex.question, "answers": list(ex.answers), "prediction": pred,
                        "correct": is_equivalent(pred, list(ex.answers)), "completion": text})
    correct = sum(d["correct"] for d in details)
    return {"accuracy": correct / max(len(details), 1), "correct": correct, "n": len(details), "details": details}
