"""Rebuilds the shipped demo model: a tiny Qwen3-architecture model (about 3.4M
parameters) initialized from a fixed seed and warmed up with supervised fine-tuning
on the synthetic task's worked solutions.

    python -m pyvf.assets.build_model [--out DIR] [--steps 800] [--shortcut-rates share=0.8,...]

The warm-up data has a bad habit built in: 60% of its worked solutions skip a step
(they divide before adding what the question adds, or forget what was given away),
so the warmed-up model often reasons its way to a wrong answer. This is what
`pyvf demo` shows VeriFree fixing: the reference answer is unlikely after a skipped
step, so the reward favours the complete reasoning. The habit is strong (80%) on three
of the five kinds of question (sharing, giving away, pouring) and weak (30%) on the two
that multiply (packs, rates), where the complete reasoning stays the most likely: there
the most common answer among samples is the right one, so majority voting (`pyvf bon
--verifier majority`) and R-Zero's pseudo-labels have something to find, while on the
other three only training helps.

Other prompts are mixed in so that every method runs on the shipped model: with the
PCL prompt (`--objective pcl`) a solution is followed by its self-evaluation and true
[accuracy, format] reward; with the question-writing prompt (R-Zero's challenger,
`pyvf selfplay`) the model writes a new question of the task; and with the
open-ended task's prompt (pyvf.data.openended, `--data openended`) it writes a short
story and rates it against the story rubric (the true ratings, by rule); with the
reference-guided prompt (`pyvf rationalize`) it writes a derivation toward a given
answer: honest, or (as often as the shortcut) one forced onto the answer or one that
gives away having seen it.
Deterministic on the CPU for a given torch version and thread count.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from pyvf.assets import ASSETS, load_tokenizer
from pyvf.data import openended
from pyvf.data.dataset import SYNTHETIC_TRAIN_SEED
from pyvf.data.synthetic import (
    ANSWER_TEMPLATE, PCL_PROMPT_TEMPLATE, QUESTION_PROMPT, QUESTION_TEMPLATE, RATIONALIZE_TEMPLATE, generate,
)
from pyvf.objectives.pcl import pcl_evaluation_text
from pyvf.ops import token_logprobs
from pyvf.packing import IGNORE_INDEX

MODEL_DIR = ASSETS / "model"
# Share of each kind of question's worked solutions that take the shortcut (60% overall).
SHORTCUT_RATES = {"share": 0.8, "give_away": 0.8, "pour": 0.8, "packs": 0.3, "rate": 0.3}


def tiny_qwen3_config(vocab_size: int, eos_id: int, pad_id: int):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
        rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=eos_id, eos_token_id=eos_id,
        pad_token_id=pad_id, attention_dropout=0.0,
    )


def rationale_text(problem, style: str) -> str:
    """A reference-guided rationale as the warm-up teaches it: an honest derivation
    ("honest"), the skipped step's reasoning with the reference asserted after it
    ("forced": the reasoning does not lead there, so the reference is unlikely after it
    without the hint), or one that gives away having seen the reference ("leak")."""
    reference = problem.answers[0]
    answer = ANSWER_TEMPLATE.format(ref=reference)
    if style == "honest":
        return problem.completion
    if style == "forced":
        return f" {problem.shortcut} {answer}"
    if style == "leak":
        return f" The reference answer is {reference}. {problem.solution} {answer}"
    raise ValueError(f"style must be honest, forced or leak, got {style!r}")


def warmup_text(problem, kind: str, shortcut: bool) -> tuple[str, str]:
    """(prompt, completion) of one arithmetic warm-up example: a worked solution
    ("solve"), the same followed by its self-evaluation ("pcl"), a new question
    ("question"), or a rationale written with the reference in view ("rationalize":
    honest, or with the shortcut the forced or the leaking kind, alternately)."""
    if kind == "rationalize":
        prompt = RATIONALIZE_TEMPLATE.format(question=problem.question, reference=problem.answers[0])
        style = "honest" if not shortcut else ("forced" if len(problem.question) % 2 else "leak")
        return prompt, rationale_text(problem, style)
    solution = problem.shortcut_completion if shortcut else problem.completion
    if kind == "solve":
        return problem.prompt, solution
    if kind == "pcl":
        return (PCL_PROMPT_TEMPLATE.format(question=problem.question),
                solution + pcl_evaluation_text(0.0 if shortcut else 1.0, 1.0))
    if kind == "question":
        return QUESTION_PROMPT, QUESTION_TEMPLATE.format(question=problem.question)
    raise ValueError(f"kind must be solve, pcl or question, got {kind!r}")


def warmup_plan(problems, g: torch.Generator, shortcut_rates: dict[str, float],
                fractions: dict[str, float]) -> tuple[list[bool], list[str]]:
    """(takes the shortcut, kind of example) per problem, drawn from `g`: the shortcut at
    its question kind's rate, the kind ("pcl", "question", ...) with the probabilities in
    `fractions` and "solve" for the rest."""
    missing = sorted({p.template for p in problems} - set(shortcut_rates))
    if missing:
        raise ValueError(f"shortcut_rates has no rate for the question kinds {missing}")
    u = torch.rand(len(problems), generator=g).tolist()
    shortcut = [x < shortcut_rates[p.template] for x, p in zip(u, problems)]
    edges, total = [], 0.0
    for kind, fraction in fractions.items():
        total += fraction
        edges.append((total, kind))
    if total > 1:
        raise ValueError(f"the example fractions add up to {total} > 1")
    u = torch.rand(len(problems), generator=g).tolist()
    return shortcut, [next((kind for edge, kind in edges if x < edge), "solve") for x in u]


def sft_batches(tokenizer, n_examples: int, batch_size: int, seed: int, shortcut_rates: dict[str, float],
                pcl_fraction: float = 0.15, question_fraction: float = 0.1, story_fraction: float = 0.15,
                rationalize_fraction: float = 0.1):
    """(input_ids [B, L], targets [B, L]) with targets only on the completion and EOS.
    A share of the worked solutions skip a step and end at a wrong answer
    (`shortcut_rates`, per kind of question): the habit the demo's VeriFree run has to
    unlearn. A `pcl_fraction` of the
    examples use the PCL prompt, a `question_fraction` the question-writing prompt, a
    `story_fraction` are rated stories of the open-ended task and a
    `rationalize_fraction` reference-guided rationales."""

    problems = generate(n_examples, seed=seed)
    stories = openended.warmup_pairs(n_examples, seed=seed)
    g = torch.Generator().manual_seed(seed)
    shortcut, kinds = warmup_plan(problems, g, shortcut_rates, {"pcl": pcl_fraction, "question": question_fraction,
                                                               "story": story_fraction,
                                                               "rationalize": rationalize_fraction})
    while True:
        order = torch.randperm(len(problems), generator=g).tolist()
        for i in range(0, len(order) - batch_size + 1, batch_size):
            rows = []
            for k in order[i:i + batch_size]:
                prompt_text, completion_text = (stories[k] if kinds[k] == "story"
                                                else warmup_text(problems[k], kinds[k], shortcut[k]))
                prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
                completion = tokenizer(completion_text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                rows.append((prompt, completion))
            width = max(len(a) + len(b) for a, b in rows)
            ids = torch.full((batch_size, width), tokenizer.pad_token_id, dtype=torch.long)
            targets = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
            for r, (prompt, completion) in enumerate(rows):
                seq = prompt + completion
                ids[r, :len(seq)] = torch.tensor(seq)
                # position t predicts token t + 1: train on the completion's tokens
                targets[r, len(prompt) - 1:len(seq) - 1] = torch.tensor(completion)
            yield ids, targets


def build(out: Path, steps: int, batch_size: int = 32, lr: float = 2e-3, seed: int = 0, log_every: int = 50,
          shortcut_rates: dict[str, float] | None = None, pcl_fraction: float = 0.15,
          question_fraction: float = 0.1, story_fraction: float = 0.15, rationalize_fraction: float = 0.1):
    from transformers import Qwen3ForCausalLM

    shortcut_rates = dict(SHORTCUT_RATES if shortcut_rates is None else shortcut_rates)
    torch.manual_seed(seed)
    tokenizer = load_tokenizer()
    config = tiny_qwen3_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    model = Qwen3ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"build_model: {n_params / 1e6:.2f}M parameters, {steps} SFT steps of {batch_size}, "
          f"shortcut solutions {', '.join(f'{k} {v:.0%}' for k, v in shortcut_rates.items())}, "
          f"{pcl_fraction:.0%} PCL, {question_fraction:.0%} question-writing, {story_fraction:.0%} story and "
          f"{rationalize_fraction:.0%} rationale examples",
          flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    batches = sft_batches(tokenizer, 20000, batch_size, SYNTHETIC_TRAIN_SEED + 100, shortcut_rates, pcl_fraction,
                          question_fraction, story_fraction, rationalize_fraction)
    start = time.time()
    model.train()
    for step in range(1, steps + 1):
        ids, targets = next(batches)
        hidden = model.model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long()).last_hidden_state
        logp = token_logprobs(hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight, targets.reshape(-1))
        loss = -logp.sum() / (targets != IGNORE_INDEX).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps:
            print(f"build_model: step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    print(f"build_model: saved to {out}")
    return model, tokenizer


def parse_rates(text: str) -> dict[str, float]:
    """"share=0.8,pour=0.3" -> the defaults with those kinds' rates replaced."""
    rates = dict(SHORTCUT_RATES)
    for item in filter(None, (s.strip() for s in text.split(","))):
        kind, _, value = (part.strip() for part in item.partition("="))
        if kind not in rates:
            raise argparse.ArgumentTypeError(f"unknown question kind {kind!r}; kinds: {', '.join(rates)}")
        try:
            rate = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"rate of {kind!r} must be a number, got {value!r}") from None
        if not 0.0 <= rate <= 1.0:
            raise argparse.ArgumentTypeError(f"rate of {kind!r} must be in [0, 1], got {rate}")
        rates[kind] = rate
    return rates


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=MODEL_DIR)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shortcut-rates", type=parse_rates, default=dict(SHORTCUT_RATES),
                        help="per kind of question, e.g. share=0.8,pour=0.3 (default: %(default)s)")
    parser.add_argument("--pcl-fraction", type=float, default=0.15)
    parser.add_argument("--question-fraction", type=float, default=0.1)
    parser.add_argument("--story-fraction", type=float, default=0.15)
    parser.add_argument("--rationalize-fraction", type=float, default=0.1)
    args = parser.parse_args(argv)
    build(args.out, args.steps, args.batch_size, args.lr, args.seed, shortcut_rates=args.shortcut_rates,
          pcl_fraction=args.pcl_fraction, question_fraction=args.question_fraction, story_fraction=args.story_fraction,
          rationalize_fraction=args.rationalize_fraction)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
