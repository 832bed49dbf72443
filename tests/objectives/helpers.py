"""Shared pieces of the objective tests: a tiny random policy on the shipped tokenizer
and hand-made samples, so an objective's coefficients can be checked against a loss
written out by its definition."""

from __future__ import annotations

import torch

from pyvf.data.dataset import Example
from pyvf.data.synthetic import PROMPT_TEMPLATE
from pyvf.objectives.base import Sample, StepContext
from pyvf.train.config import TrainConfig, from_dict, owners


def tiny_policy(lm_head_pass: str = "autograd"):
    """The shipped demo model: trained on the synthetic task, so the references get
    probabilities far from 0 (a random model's would underflow the gradients)."""
    from pyvf.runtime.model import load_model_and_tokenizer
    from pyvf.runtime.policy import Policy

    model, tok = load_model_and_tokenizer("builtin")
    return Policy(model, lm_head_pass=lm_head_pass), tok


# A synthetic question (answers 4/5 and 0.8) and completions of every kind.
QUESTION = ("A jug holds 3 liters of tea and 10 more liters are added. 9 liters spill, and the rest is poured "
            "equally into 5 bottles. How many liters are in each bottle?")
TEXTS = [
    " 3 + 10 = 13. 13 - 9 = 4. 4 / 5 = 4/5. <answer> \\boxed{4/5} </answer>",   # right
    " 3 + 10 = 13. 13 / 5 = 13/5. <answer> \\boxed{13/5} </answer>",            # a skipped step
    " 3 + 10 = 13. 13 - 9",                                                   # truncated, no marker
    " 3 + 10 = 13. 13 - 9 = 4. 4 / 5 = 0.8.<answer> \\boxed{0.8} </answer>",   # right, glued marker
]


def make_samples(tok, texts=TEXTS, n_groups: int = 2, answers=("4/5", "0.8"), truncated=(2,)):
    """n_groups groups of len(texts) samples; text k of each group; indices in
    `truncated` end at the length limit."""
    prompt = tok(PROMPT_TEMPLATE.format(question=QUESTION), add_special_tokens=False)["input_ids"]
    ex = Example(QUESTION, tuple(answers), tuple(1.0 / len(answers) for _ in answers))
    samples = []
    for g in range(n_groups):
        for k, text in enumerate(texts):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            logprobs = [-0.5] * len(ids)
            samples.append(Sample(g, ex, prompt, ids, "length" if k in truncated else "stop", logprobs, g))
    return samples


def context(policy, **kw) -> StepContext:
    return StepContext(step=kw.pop("step", 1), policy=policy, temperature=1.0, device=torch.device("cpu"), **kw)


def config(**kw) -> TrainConfig:
    """A train config; an objective's keys pick that objective when none is named."""
    named = [owners(k) for k in kw if owners(k)]
    if "objective" not in kw and named:
        common = set.intersection(*map(set, named))
        kw["objective"] = next(o for o in named[0] if o in common)
    return from_dict({"max_seq_len": 256, "micro_batch_tokens": 8192, **kw})


def grads(policy) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])
