"""R-Zero (arXiv 2508.05004, Chengsong-Huang/R-Zero; docs/algorithms.md): one base model
as challenger and solver, no labels. The challenger writes `<question>...</question>`;
the frozen solver answers each question m times; the majority answer is the
pseudo-label and p_hat its share. The challenger is rewarded for questions the solver
is unsure of, min(p_hat, 1 - p_hat) (the official code; the paper writes
1 - 2|p_hat - 1/2|, the same up to a factor 2), minus a repetition penalty: the share of
the batch in the question's cluster, clusters from average-linkage agglomerative
clustering of BLEU distances at 0.5. A malformed output scores -1 minus its penalty.
The solver then trains on the questions with 0.3 <= p_hat <= 0.8, the pseudo-labels as
references (`pyvf selfplay`, pyvf/workflows/selfplay.py, alternates the two).

This file holds the formulas and the challenger's Objective (`--objective rzero`); the
solver phase is an ordinary verifier or VeriFree run on the labelled questions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pyvf.chat import render_prompt_ids, stop_token_ids
from pyvf.data.answers import equivalent_pair, last_boxed
from pyvf.data.synthetic import QUESTION_PROMPT
from pyvf.objectives.base import Objective, ObjectiveConfig, Sample, StepContext, add_metric, index_in_group
from pyvf.options import option
from pyvf.runtime import distributed
from pyvf.runtime.model import load_model_and_tokenizer
from pyvf.runtime.rollout import HFGenerate, continuation_seed

_QUESTION_BLOCK = re.compile(r"<question>(.*?)</question>", re.DOTALL)

BAND = (0.3, 0.8)                  # official solver_train.sh: 0.3 <= p_hat <= 0.8
BLEU_DISTANCE_THRESHOLD = 0.5      # official caller_penalty.py: distance_threshold=0.5, linkage="average"
MALFORMED_REWARD = -1.0
QUESTION_STOP = "</question>"      # where the challenger's output ends, in training and in `pyvf selfplay`


def extract_question(text: str) -> str | None:
    """The last `<question>...</question>` of a challenger output, stripped, or None
    when there is none or it is empty (official `compute_score`: last match, DOTALL)."""
    blocks = _QUESTION_BLOCK.findall(text)
    question = blocks[-1].strip() if blocks else ""
    return question or None


def _same_answer(a: str, b: str) -> bool:
    # The official vote checks grade_answer both ways.
    return equivalent_pair(a, b) or equivalent_pair(b, a)


def pseudo_label(answers: Sequence[str | None]) -> tuple[str | None, float]:
    """(majority answer, p_hat) of the solver's m answers. Each answer joins the first
    earlier cluster whose first member it is equivalent to; a missing answer (None)
    counts, in a cluster of its own, as the official code counts "None"; the largest
    cluster wins, ties to the one formed first; p_hat = its size / m. The label is None
    when no answer was given or the missing ones win."""
    if not answers:
        raise ValueError("answers must hold at least one answer (m >= 1)")
    heads: list[str | None] = []
    counts: list[int] = []
    for a in answers:
        for k, head in enumerate(heads):
            if (a is None and head is None) or (a is not None and head is not None and _same_answer(a, head)):
                counts[k] += 1
                break
        else:
            heads.append(a)
            counts.append(1)
    best = max(range(len(heads)), key=lambda k: (counts[k], -k))
    return heads[best], counts[best] / len(answers)


def uncertainty_reward(p_hat: float) -> float:
    """min(p_hat, 1 - p_hat): 0.5 when the solver splits evenly, 0 when it agrees."""
    if not 0.0 <= p_hat <= 1.0:
        raise ValueError(f"p_hat must be in [0, 1], got {p_hat}")
    return min(p_hat, 1.0 - p_hat)


def in_band(p_hat: float, label: str | None, band: tuple[float, float] = BAND) -> bool:
    """Whether a question goes to the solver: a label, and band[0] <= p_hat <= band[1]."""
    return label is not None and band[0] <= p_hat <= band[1]


def _sentence_bleu():
    import logging

    try:
        from sacrebleu.metrics import BLEU
    except ImportError:
        raise ImportError("R-Zero's repetition penalty needs sacrebleu: pip install 'pyvf[rzero]'") from None
    logging.getLogger("sacrebleu").setLevel(logging.ERROR)  # its advice to use effective_order, once per pair
    return BLEU(tokenize="none", smooth_method="floor", smooth_value=0.1, effective_order=False)


def bleu_distances(questions: Sequence[str]) -> torch.Tensor:
    """[n, n] 1 - BLEU(q_i, q_j) / 100, symmetric with a zero diagonal. As the official
    code (NLTK sentence_bleu, method1 smoothing, whitespace tokens, computed for i < j
    with q_i as hypothesis and mirrored), with sacrebleu: tokenize "none" splits on
    whitespace, smooth "floor" 0.1 is method1's epsilon on zero n-gram counts. Both give
    0 without a unigram match; they differ only for a hypothesis under 4 words, which
    sacrebleu scores 0 where NLTK's smoothing gives a small positive value."""
    bleu = _sentence_bleu()
    n = len(questions)
    dist = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            d = 1.0 - bleu.sentence_score(questions[i], [questions[j]]).score / 100.0
            dist[i, j] = dist[j, i] = d
    return dist


def average_linkage_clusters(distances: torch.Tensor, threshold: float = BLEU_DISTANCE_THRESHOLD) -> list[int]:
    """Cluster label of each item: agglomerative clustering with average linkage,
    merging the closest pair of clusters while their mean pairwise distance is below
    `threshold` (sklearn's AgglomerativeClustering(distance_threshold=...,
    linkage="average"), which the official code uses). The distances between clusters
    are updated in place (Lance-Williams: the merged cluster's distance to another is
    the size-weighted mean of its parts'), O(n^2) per merge. Labels number clusters in
    the order of their first member."""
    n = distances.shape[0]
    if distances.shape != (n, n):
        raise ValueError(f"distances must be a square matrix, got {tuple(distances.shape)}")
    d = distances.double().clone()
    d.fill_diagonal_(float("inf"))
    size = torch.ones(n, dtype=torch.float64)
    parent = list(range(n))
    for _ in range(n - 1):
        k = int(torch.argmin(d))
        a, b = divmod(k, n)
        if not d[a, b] < threshold:
            break
        a, b = min(a, b), max(a, b)
        merged = (size[a] * d[a] + size[b] * d[b]) / (size[a] + size[b])
        d[a], d[:, a] = merged, merged
        d[b], d[:, b] = float("inf"), float("inf")
        d[a, a] = float("inf")
        size[a] += size[b]
        parent[b] = a

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    labels, first = [], {}
    for i in range(n):
        labels.append(first.setdefault(root(i), len(first)))
    return labels


def repetition_penalties(questions: Sequence[str]) -> torch.Tensor:
    """[n] share of the batch in each question's BLEU cluster (|cluster| / n)."""
    n = len(questions)
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    labels = average_linkage_clusters(bleu_distances(questions))
    sizes = torch.bincount(torch.tensor(labels), minlength=max(labels) + 1).double()
    return sizes[torch.tensor(labels)] / n


def challenger_rewards(questions: Sequence[str | None], p_hats: Sequence[float]) -> torch.Tensor:
    """[n] min(p_hat, 1 - p_hat) - penalty, or -1 - penalty for a malformed output (no
    question); the penalty clusters every output of the batch, malformed ones as empty
    text (official `compute_score`, no clipping)."""
    if len(questions) != len(p_hats):
        raise ValueError(f"questions and p_hats must have the same length, got {len(questions)} and {len(p_hats)}")
    penalty = repetition_penalties([q or "" for q in questions])
    base = torch.tensor([uncertainty_reward(p) if q is not None else MALFORMED_REWARD
                         for q, p in zip(questions, p_hats)], dtype=torch.float64)
    return base - penalty


class Solver:
    """The frozen solver of a challenger phase: answers questions m times with the
    task's prompt and votes."""

    def __init__(self, model, tokenizer, cfg):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.engine = HFGenerate(model, tokenizer, stop_token_ids=stop_token_ids(model, tokenizer))

    @classmethod
    def load(cls, spec: str, cfg, device) -> "Solver":
        model, tokenizer = load_model_and_tokenizer(spec)
        model.to(device).eval().requires_grad_(False)
        return cls(model, tokenizer, cfg)

    def prompt_ids(self, question: str) -> list[int]:
        cfg = self.cfg
        return render_prompt_ids(self.tokenizer, question, chat_template=cfg.chat_template,
                                 system_prompt=cfg.system_prompt, assistant_prefix=cfg.assistant_prefix)

    @torch.no_grad()
    def vote(self, questions: list[str], seeds: list[int], m: int) -> list[tuple[str | None, float]]:
        """(label, p_hat) per question, from m sampled answers each."""
        if not questions:
            return []
        cfg = self.cfg
        outputs = self.engine.generate([self.prompt_ids(q) for q in questions], m, max_new_tokens=cfg.max_new_tokens,
                                       temperature=1.0, seeds=seeds, stop=cfg.stop_strings())
        return [pseudo_label([last_boxed(self.tokenizer.decode(c.ids, skip_special_tokens=True)) for c in row])
                for row in outputs]


@dataclass
class RZeroConfig(ObjectiveConfig):
    solver_model: str = option("", "the frozen solver that answers the challenger's questions (\"\": the model)")
    solver_samples: int = option(10, "answers per question for the majority vote (m; official 10)", minimum=1)


class RZeroChallenger(Objective):
    """The challenger phase: GRPO on challenger_rewards, the solver frozen
    (solver_model, default the starting model)."""

    name = "rzero"
    Config = RZeroConfig
    prompt_template = QUESTION_PROMPT
    needs_references = False       # the challenger's prompt is fixed; the data's questions are not used

    def prompt(self, question: str, template: str) -> tuple[str, str]:
        """The challenger's prompt is the template itself, the same for every example: its
        questions come from the model, not from the data."""
        return (template, "{question}") if "{question}" not in template else (question, template)

    def attach(self, policy) -> None:
        _sentence_bleu()  # fail before training when sacrebleu is missing
        device = next(policy.parameters()).device
        self.solver = Solver.load(self.config.solver_model or self.cfg.model, self.cfg, device)

    def score(self, samples: list[Sample], ctx: StepContext) -> torch.Tensor:
        cfg = self.cfg
        questions = [extract_question(self.tokenizer.decode(s.ids, skip_special_tokens=True)) for s in samples]
        seeds = [continuation_seed(cfg.seed, ctx.step, s.group, j) for s, j in zip(samples, index_in_group(samples))]
        valid = [i for i, q in enumerate(questions) if q is not None]
        votes = self.solver.vote([questions[i] for i in valid], [seeds[i] for i in valid], self.config.solver_samples)
        p_hat = [0.0] * len(samples)
        labels: list[str | None] = [None] * len(samples)
        for i, (label, p) in zip(valid, votes):
            labels[i], p_hat[i] = label, p
        # The penalty clusters the whole step's questions: every rank's, in group order.
        mine = [(s.group, j, q, p) for j, (s, q, p) in enumerate(zip(samples, questions, p_hat))]
        everyone = sorted(x for part in distributed.all_gather_objects(mine) for x in part)
        rewards_all = challenger_rewards([x[2] for x in everyone], [x[3] for x in everyone])
        position = {(g, j): k for k, (g, j, _, _) in enumerate(everyone)}
        rewards = torch.stack([rewards_all[position[(s.group, j)]] for j, s in enumerate(samples)]) \
            if samples else torch.zeros(0, dtype=torch.float64)
        n, m = len(samples), ctx.metrics
        add_metric(m, "rzero_valid_frac", len(valid), n)
        add_metric(m, "rzero_p_hat", sum(p_hat[i] for i in valid), len(valid))
        add_metric(m, "rzero_in_band_frac", sum(in_band(p_hat[i], labels[i]) for i in valid), n)
        add_metric(m, "rzero_unique_frac", len({q for q in questions if q is not None}), n)
        return rewards
