"""Reference-guided rationales (RAVR, arXiv 2510.25206; README: Reference-guided rationales and best-of-N; `pyvf rationalize`).

For each question the model sees the question and its reference answer
(`pyvf.data.synthetic.RATIONALIZE_TEMPLATE`) and writes K rationales z. Each is cut
at the answer marker (`pyvf.splice.splice_reference`, token-exact) and scored as
VeriFree scores a completion, but after the PLAIN task prompt, the reference absent:
    score(z) = sum_k w_k pi(y*_k | x, z)

so a rationale scores high only when its reasoning, read without the hint, leads to
the reference. A rationale forced onto the answer (reasoning that goes elsewhere, then
the reference asserted) scores low. The score only sees what the reasoning leads to,
so a rationale with a slip early on (13 + 19 = 34. 34 - 8 = 24. 24 / 8 = 3.) can score
as high as a clean one; by default (`select="score_x_plausibility"`) the best is the
one with the highest score x plausibility, the geometric-mean probability of the
rationale's tokens after the plain prompt (a slip is an unlikely token there), and
`select="score"` ranks by the score alone. Rationales that give the reference away are
dropped before scoring (`leak_reason`): they would teach the model to state answers it
has not derived. The best rationale per question is kept and written as a row that
`pyvf sft` trains on (its `completion`: the rationale, then the answer block with the
first reference).

Counts: every sample is scored or dropped for exactly one reason (`leak_mentions`,
`leak_early`, `no_marker`), so samples == scored + the three drops; questions whose
every sample was dropped get no row (`questions_without_rationale`).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch

from pyvf.chat import render_prompt_ids, stop_token_ids
from pyvf.data import dataset
from pyvf.data.answers import normalize
from pyvf.data.synthetic import RATIONALIZE_TEMPLATE
from pyvf.options import ConfigError, add_options, from_args, option
from pyvf.packing import Sequence
from pyvf.runtime.checkpoint import write_atomic
from pyvf.runtime.policy import Policy, score_rows
from pyvf.runtime.rollout import HFGenerate, prompt_seed
from pyvf.splice import splice_reference
from pyvf.train.config import TrainConfig
from pyvf.verify.verifree import verifree_scores
from pyvf.workflows.common import SamplingOptions, load_model, prompting

# Phrases that say the writer saw or was given the answer. Matched case-insensitively on
# word boundaries; kept specific, since "given" alone is ordinary in word problems
# ("given 3 apples").
LEAK_PHRASES = (
    r"reference answers?", r"the reference", r"given answer", r"answer (?:i was|we were|i am|we are) given",
    r"answer (?:was|is) given", r"provided answer", r"expected answer", r"known answer", r"correct answer is",
    r"answer key", r"i was told", r"we were told", r"i(?:'ve| have)? (?:already )?(?:seen|been shown) the answer",
    r"i already know", r"(?:we|i) know the answer", r"i was given", r"the hint", r"prior access",
    r"working backwards? from the answer",
)
_LEAK_PATTERN = re.compile(r"\b(?:" + "|".join(LEAK_PHRASES) + r")\b", re.IGNORECASE)
# Steps: the text split after a sentence end (., ! or ?) followed by white space, so the
# point of a decimal (0.8) does not split.
_STEP_END = re.compile(r"(?<=[.!?])\s+")
# Numbers as written in a derivation: 13, -2, 0.8, 4/5 (no spaces: "4 / 5" is an
# operation, not a stated value) and \frac{4}{5}.
_NUMBER = re.compile(r"\\[dt]?frac\{[^{}]+\}\{[^{}]+\}|(?<![\w.])[+-]?\d+(?:\.\d+)?(?:/\d+(?:\.\d+)?)?(?![\w/])")


def split_steps(text: str) -> list[str]:
    """The steps of a rationale: sentences, split after ., ! or ? followed by white space."""
    return [s for s in (p.strip() for p in _STEP_END.split(text.strip())) if s]


def _numbers(text: str) -> list[Fraction]:
    values = []
    for match in _NUMBER.finditer(text):
        value = normalize(match.group(0))
        if isinstance(value, Fraction):
            values.append(value)
    return values


def leak_reason(rationale: str, references, *, question: str = "") -> str | None:
    """Why a rationale gives its reference away, or None when it does not.

    "mentions": it says it saw or was given the answer (one of LEAK_PHRASES, e.g.
    "the reference answer is", "I was told", "I already know the answer").
    "early": a reference is stated before the last step. Steps are sentences
    (`split_steps`); a numeric reference counts when any number written in an earlier
    step equals it (4/5, 0.8 and \\frac{4}{5} are the same value); a non-numeric
    reference when it appears there as a whole word or phrase (case-insensitive).

    Numbers that appear in `question` are not counted: restating what was given is not
    a leak. Known false positives of "early": an intermediate value that happens to
    equal the answer (13 - 9 = 4, then 4 / 1 = 4), or a check written after the result
    in a later sentence ("So each gets 4. Check: 4 * 5 = 20." states 4 before the last
    step). Such rationales are dropped although honest; the filter prefers dropping an
    honest rationale to training on a leaked one."""
    if isinstance(references, str):
        references = [references]
    references = [r.strip() for r in references if isinstance(r, str) and r.strip()]
    if not references:
        raise ValueError("references must hold at least one non-empty reference answer")
    if _LEAK_PATTERN.search(rationale):
        return "mentions"
    steps = split_steps(rationale)
    if len(steps) < 2:
        return None
    given = set(_numbers(question))
    numeric = {v for v in (normalize(r) for r in references) if isinstance(v, Fraction)} - given
    words = [r for r in references if not isinstance(normalize(r), Fraction)]
    word_patterns = [re.compile(r"(?<!\w)" + re.escape(w) + r"(?!\w)", re.IGNORECASE) for w in words]
    for step in steps[:-1]:
        if numeric and any(v in numeric for v in _numbers(step)):
            return "early"
        if any(p.search(step) for p in word_patterns):
            return "early"
    return None


@dataclass
class Candidate:
    text: str            # the rationale: the completion before the marker
    score: float         # sum_k w_k pi(y*_k | plain prompt, rationale)
    plausibility: float  # exp(mean log pi(z_t | plain prompt, z_<t)) over the rationale (1.0 when not computed)

    @property
    def key(self) -> float:
        return self.score * self.plausibility


# How the best rationale of a question is chosen: by its score alone, or by the score
# times the rationale's plausibility without the hint (see `rationalize`).
SELECT = ("score", "score_x_plausibility")
COUNT_KEYS = ("questions", "samples", "scored", "leak_mentions", "leak_early", "no_marker",
              "questions_without_rationale", "rows")


def rationalize(model, tokenizer, examples, *, samples: int = 4, seed: int = 0, max_new_tokens: int = 64,
                temperature: float = 1.0, batch_size: int = 16, prompt_template: str = "",
                chat_template: str = "auto", system_prompt: str = "", assistant_prefix: str = "",
                rationalize_template: str | None = None, min_score: float = 0.0, max_seq_len: int = 512,
                select: str = "score_x_plausibility", engine=None, progress=None) -> tuple[list[dict], dict]:
    """Writes `samples` reference-guided rationales per example and keeps the best.

    The rationale prompt is `rationalize_template` (default RATIONALIZE_TEMPLATE, with
    {question} and {reference}: the first reference) rendered as a question through
    the chat template when the tokenizer has one; the scoring prompt is the task's
    (`prompt_template`, default the synthetic task's), the reference absent. Sampling is
    seeded per question (`prompt_seed(seed, 0, index)`), so a question's rationales do not
    depend on the batch. A best score below `min_score` keeps no row for that question.

    Returns (rows, counts): one row per kept question with `question`, `answer` (the
    references), `rationale`, `completion` (rationale + marker + answer block with the
    first reference: what SFT trains on), `score`, `plausibility` (1.0 under
    select="score") and `candidates` (rationales scored for that question); counts as
    in the module docstring. `select` ranks a question's rationales (module docstring).
    `progress(done, total, counts)` is called after each batch of questions. `engine`
    samples (a `RolloutEngine`; default HFGenerate over `model`)."""

    if select not in SELECT:
        raise ValueError(f"select must be one of {', '.join(SELECT)}, got {select!r}")
    for name, value in (("samples", samples), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    template = RATIONALIZE_TEMPLATE if rationalize_template is None else rationalize_template
    if "{question}" not in template or "{reference}" not in template:
        raise ValueError(f"rationalize_template must contain {{question}} and {{reference}}, got {template!r}")
    missing = [i for i, ex in enumerate(examples) if not ex.answers]
    if missing:
        raise ValueError(f"examples: rationales are written toward a reference answer; example {missing[0]} "
                         f"({len(missing)} in all) has none")

    defaults = TrainConfig()  # the marker and answer template of training
    marker, answer_template = defaults.marker, defaults.answer_template
    token_budget = max(defaults.micro_batch_tokens, max_seq_len)
    policy = Policy(model)
    device = model.get_output_embeddings().weight.device
    if engine is None:
        engine = HFGenerate(model, tokenizer, stop_token_ids=stop_token_ids(model, tokenizer))
    render = dict(chat_template=chat_template, system_prompt=system_prompt, assistant_prefix=assistant_prefix)

    counts = dict.fromkeys(COUNT_KEYS, 0)
    counts["questions"] = len(examples)
    rows = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        guided = [render_prompt_ids(tokenizer, template.format(question=ex.question, reference=ex.answers[0]),
                                    template="{question}", **render) for ex in batch]
        plain = [render_prompt_ids(tokenizer, ex.question, template=prompt_template, **render) for ex in batch]
        seeds = [prompt_seed(seed, 0, start + j) for j in range(len(batch))]
        outputs = engine.generate(guided, samples, max_new_tokens=max_new_tokens, temperature=temperature,
                                  seeds=seeds, stop=["</answer>"])
        kept_prompts, kept_ids, kept_examples, kept_owner, kept_text, kept_reasoning = [], [], [], [], [], []
        for j, (ex, completions) in enumerate(zip(batch, outputs)):
            for completion in completions:
                counts["samples"] += 1
                spliced = splice_reference(tokenizer, completion.ids, [ex.answers[0]], marker=marker,
                                           answer_template=answer_template)[0]
                if not spliced.found:
                    counts["no_marker"] += 1
                    continue
                text = tokenizer.decode(spliced.reasoning_ids, skip_special_tokens=False,
                                        clean_up_tokenization_spaces=False)
                rationale = text[:len(text) - len(marker)] if text.endswith(marker) else text
                reason = leak_reason(rationale, ex.answers, question=ex.question)
                if reason is not None:
                    counts[f"leak_{reason}"] += 1
                    continue
                kept_prompts.append(plain[j])
                kept_ids.append(completion.ids)
                kept_examples.append(ex)
                kept_owner.append(j)
                kept_text.append(rationale)
                kept_reasoning.append(spliced.reasoning_ids)
        scores = verifree_scores(policy, tokenizer, kept_prompts, kept_ids, [ex.answers for ex in kept_examples],
                                 [ex.weights for ex in kept_examples], temperature=1.0, device=device,
                                 marker=marker,
                                 answer_template=answer_template, max_seq_len=max_seq_len,
                                 token_budget=token_budget) if kept_ids else torch.zeros(0, dtype=torch.float64)
        counts["scored"] += len(kept_ids)
        plausibility = [1.0] * len(kept_ids)
        if select == "score_x_plausibility" and kept_ids:
            with torch.no_grad():
                rationales = [Sequence(p, r, [], group=0) for p, r in zip(kept_prompts, kept_reasoning)]
                logprobs = score_rows(policy, rationales, token_budget, temperature=1.0, device=device)
            plausibility = [math.exp(float(lp.mean())) for lp in logprobs]
        best: dict[int, Candidate] = {}
        candidates: dict[int, int] = {}
        for j, text, score, plausible in zip(kept_owner, kept_text, scores.tolist(), plausibility):
            candidates[j] = candidates.get(j, 0) + 1
            candidate = Candidate(text, score, plausible)
            if j not in best or candidate.key > best[j].key:  # ties: the first sample
                best[j] = candidate
        for j, ex in enumerate(batch):
            if j not in best or best[j].score < min_score:
                counts["questions_without_rationale"] += 1
                continue
            completion_text = best[j].text + marker + answer_template.format(ref=ex.answers[0])
            rows.append({"question": ex.question, "answer": list(ex.answers), "rationale": best[j].text,
                         "completion": completion_text, "score": best[j].score,
                         "plausibility": best[j].plausibility, "candidates": candidates[j]})
        if progress is not None:
            progress(min(start + batch_size, len(examples)), len(examples), counts)
    counts["rows"] = len(rows)
    return rows, counts


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """The rows, one JSON object a line, written to a temporary file then renamed (a
    reader never sees half a file)."""
    return write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def counts_path(output: str | Path) -> Path:
    """Where `pyvf rationalize` writes the counts: next to the rows, `<output>.counts.json`."""
    output = Path(output)
    return output.with_name(output.name + ".counts.json")


class Progress:
    """`progress` for `rationalize`: one line per batch on stderr."""

    def __init__(self, stream=None):
        self.start = time.time()
        self.stream = stream if stream is not None else sys.stderr

    def __call__(self, done: int, total: int, counts: dict) -> None:
        dropped = counts["leak_mentions"] + counts["leak_early"] + counts["no_marker"]
        print(f"rationalize: {done}/{total} questions, {counts['samples']} samples, {counts['scored']} scored, "
              f"{dropped} dropped ({time.time() - self.start:.0f} s)", file=self.stream, flush=True)


HELP = "RAVR: rationales written with the reference in view, scored without it; best kept"
DESCRIPTION = ("Samples --samples rationales per question with the reference answer in the prompt, drops those "
               "that give it away (pyvf.workflows.rationalize.leak_reason) or have no answer marker, scores the "
               "rest by pi(reference | plain prompt, rationale) and writes the best per question as JSONL rows "
               "for pyvf sft (counts in OUTPUT.counts.json).")


@dataclass
class RationalizeOptions(SamplingOptions):
    model: str = option("builtin", "model directory, a run, or builtin")
    data: str = option("synthetic", "JSONL file of question/answer rows, or synthetic (its training split)")
    output: str = option("rationales.jsonl", "JSONL file for the kept rationales")
    samples: int = option(4, "rationales sampled per question (K)", minimum=1)
    limit: int | None = option(None, "only the first N questions (synthetic: default 500)", minimum=1)
    min_score: float = option(0.0, "keep a question's best rationale only when it scores at least this")
    select: str = option("score_x_plausibility", "how a question's best rationale is chosen: pi(reference | "
                         "prompt, rationale) alone, or times the rationale's geometric-mean token probability after "
                         "the plain prompt", choices=SELECT)


def add_args(parser: argparse.ArgumentParser) -> None:
    add_options(parser, RationalizeOptions)


def main(args: argparse.Namespace) -> int:
    opts = from_args(RationalizeOptions, args)
    if opts.data == "openended":
        raise ConfigError("--data openended has no reference answers to write rationales toward")
    examples = dataset.load(opts.data, n_synthetic=opts.limit or 500, split="train")
    if opts.limit is not None:
        examples = examples[:opts.limit]
    model, tokenizer = load_model(opts.model)
    print(f"rationalize: {len(examples)} questions x {opts.samples} rationales, model {opts.model}, data {opts.data}",
          flush=True)
    rows, counts = rationalize(model, tokenizer, examples, samples=opts.samples, seed=opts.seed,
                               max_new_tokens=opts.max_new_tokens, temperature=opts.temperature,
                               batch_size=opts.batch_size, min_score=opts.min_score, max_seq_len=opts.max_seq_len,
                               select=opts.select, progress=Progress(), **prompting(opts))
    write_jsonl(rows, opts.output)
    summary = counts_path(opts.output)
    write_atomic(summary, json.dumps({**counts, "model": opts.model, "data": opts.data,
                                      "samples_per_question": opts.samples, "seed": opts.seed}, indent=2))
    mean = sum(r["score"] for r in rows) / len(rows) if rows else 0.0
    print(f"rationalize: {counts['samples']} samples: {counts['scored']} scored, dropped {counts['leak_mentions']} "
          f"mentioning the reference, {counts['leak_early']} stating it early, {counts['no_marker']} without an "
          f"answer marker")
    print(f"rationalize: kept {len(rows)}/{counts['questions']} questions (mean score {mean:.3f}) -> {opts.output} "
          f"(counts: {summary})")
    return 0


__all__ = ["COUNT_KEYS", "LEAK_PHRASES", "Progress", "counts_path", "leak_reason", "rationalize", "split_steps",
           "write_jsonl"]
