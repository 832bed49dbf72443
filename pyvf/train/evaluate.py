"""Greedy evaluation: the last \\boxed{...} of each completion, compared with every
reference (8/5 == 1.6; math-verify when installed). Prompts are rendered as in
training (chat template when the tokenizer has one), and generation stops at EOS or
the stop strings (`</answer>` by default, so a PCL model's self-evaluation after its
answer costs nothing when serving)."""

from __future__ import annotations

from pyvf.chat import render_prompt_ids, stop_token_ids
from pyvf.data.answers import is_equivalent, last_boxed
from pyvf.data.dataset import Example
from pyvf.train.rollout import greedy


def evaluate(model, tokenizer, examples: list[Example], *, max_new_tokens: int = 64, prompt_template: str = "",
             chat_template: str = "auto", system_prompt: str = "", assistant_prefix: str = "",
             stop: tuple[str, ...] = ("</answer>",), batch_size: int = 64) -> dict:
    prompts = [render_prompt_ids(tokenizer, ex.question, template=prompt_template, chat_template=chat_template,
                                 system_prompt=system_prompt, assistant_prefix=assistant_prefix) for ex in examples]
    outputs = greedy(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size, stop=list(stop),
                     stop_token_ids=stop_token_ids(model, tokenizer))
    details = []
    for ex, out in zip(examples, outputs):
        text = tokenizer.decode(out, skip_special_tokens=True)
        pred = last_boxed(text)
        details.append({"question": ex.question, "answers": list(ex.answers), "prediction": pred,
                        "correct": is_equivalent(pred, list(ex.answers)), "completion": text,
                        "completion_tokens": len(out)})
    correct = sum(d["correct"] for d in details)
    return {"accuracy": correct / max(len(details), 1), "correct": correct, "n": len(details), "details": details}
