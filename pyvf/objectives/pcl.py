"""Post-completion learning (PCL, arXiv 2507.20252, xfey/Post-Completion-Learning;
docs/algorithms.md): after its answer the model writes a self-evaluation and a
predicted reward, `<evaluation>...</evaluation> <reward>[accuracy, format]</reward>`,
trained toward the true rewards. Serving stops at `</answer>`, so the evaluation costs
nothing there.

Training: the rollout stops at the answer as usual, then `continue_rollout` samples on
from every completion that ended there, with EOS not allowed as the first token (the
model must evaluate; it ends at EOS or the evaluation budget). Rewards (weights 1/1/1,
as the official recipes): accuracy (the rule checker, or the VeriFree probability with
`pcl_accuracy: verifree`), the full answer-evaluation-reward format, and the
consistency of the predicted rewards with the true ones on the answer part. Loss:
GRPO (eps 1e-4, token mean) on every sampled token, plus `pcl_sft_answer` x accuracy
on the reasoning and answer tokens (SFT on correct samples), plus `pcl_sft_evaluation`
on an evaluation text written from the true rewards (its own teacher-forced sequence
after the sampled answer).
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections import abc
from dataclasses import dataclass, replace

import torch

from pyvf.data.synthetic import PCL_PROMPT_TEMPLATE
from pyvf.objectives.base import (
    LOSS_AGGREGATIONS, MicroBatch, Objective, ObjectiveConfig, Sample, StepContext, TrainSequences, add_metric,
    index_in_group,
)
from pyvf.objectives.verifier import verifier_rewards
from pyvf.options import option
from pyvf.packing import ROLE_POST, Sequence
from pyvf.runtime.rollout import continuation_seed
from pyvf.verify.verifree import verifree_scores

_REWARD_BLOCK = re.compile(r"<reward>.*?</reward>", re.DOTALL)
_ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _eval_number(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _eval_number(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
        return _ARITH[type(node.op)](_eval_number(node.left), _eval_number(node.right))
    raise ValueError("not a number")


def parse_pcl_reward(text: str) -> list[float] | None:
    """The numbers of the LAST <reward>...</reward> block of `text`, e.g. "[1, 0.5]", or
    None when there is none or it is not a list/tuple of numbers. The official code
    (src/open_r1/rewards.py, `rewarding_reward`) runs Python's eval on the block; pyvf
    accepts the same literals and + - * / arithmetic but evaluates nothing else."""
    blocks = _REWARD_BLOCK.findall(text)
    if not blocks:
        return None
    body = blocks[-1][len("<reward>"):-len("</reward>")].strip()
    try:
        node = ast.parse(body, mode="eval").body
        if not isinstance(node, (ast.List, ast.Tuple)):
            return None
        return [_eval_number(e) for e in node.elts]
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError, MemoryError, OverflowError):
        return None


def pcl_consistency(ground_truth: abc.Sequence[float], predicted: abc.Sequence[float] | None) -> float:
    """1 - mean_k |gt_k - pred_k| / max(gt_k, pred_k) (src/open_r1/rewards.py,
    `rewarding_reward`). A missing (None), wrong-length, negative or NaN prediction scores
    0. A term with gt_k = pred_k = 0 counts as a perfect match: the official code divides
    0 by 0 there, its try/except turns the error into a reward of 0 for the whole
    completion, so predicting a 0 correctly earns nothing; pyvf does not copy that bug."""
    gt = [float(v) for v in ground_truth]
    if any(not math.isfinite(v) or v < 0 for v in gt):
        raise ValueError(f"ground_truth must hold finite non-negative numbers, got {gt}")
    if predicted is None:
        return 0.0
    pred = [float(v) for v in predicted]
    if len(pred) != len(gt) or not gt or any(math.isnan(v) or v < 0 for v in pred):
        return 0.0
    total = 0.0
    for g, p in zip(gt, pred):
        denom = max(g, p)
        total += 0.0 if denom == 0 else abs(g - p) / denom
    return 1.0 - total / len(gt)


def pcl_consistency_rewards(ground_truth: abc.Sequence[abc.Sequence[float]], completions: list[str]) -> torch.Tensor:
    """`pcl_consistency` of each completion's parsed <reward> block against its ground-truth
    rewards (accuracy, format of the think-answer part)."""
    if len(ground_truth) != len(completions):
        raise ValueError(f"ground_truth and completions must have the same length, got {len(ground_truth)} "
                         f"and {len(completions)}")
    return torch.tensor([pcl_consistency(g, parse_pcl_reward(c)) for g, c in zip(ground_truth, completions)],
                        dtype=torch.float64)


_ANSWER_PART = re.compile(r"(?:(?!<answer>).)*<answer>\s*\\boxed\{[^<]+\}\s*</answer>\s*", re.DOTALL)
_EVALUATION_PART = re.compile(r"\s*<evaluation>.*?</evaluation>\s*<reward>.*?</reward>\s*", re.DOTALL)


def pcl_answer_format(text: str) -> float:
    """1.0 when the reasoning-and-answer part is well formed: reasoning, then one
    `<answer> \\boxed{...} </answer>` ending it; else 0. The official `format_reward`
    checks `<think>...</think><answer>...</answer>`; pyvf's tasks write the reasoning
    without think tags, so the check is on the answer block."""
    return 1.0 if _ANSWER_PART.fullmatch(text) else 0.0


def pcl_full_format(answer_part: str, evaluation_part: str) -> float:
    """1.0 when the answer part is well formed and the rest is exactly
    `<evaluation>...</evaluation> <reward>...</reward>` (official `format_reward_all`)."""
    return 1.0 if pcl_answer_format(answer_part) and _EVALUATION_PART.fullmatch(evaluation_part) else 0.0


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.2f}"


def pcl_evaluation_text(accuracy: float, answer_format: float) -> str:
    """The evaluation the model is taught to write after its answer, from the true
    rewards: a verdict and the reward block. The official code learns a teacher model's
    written evaluations; pyvf writes it from the rewards, so it needs no teacher."""
    verdict = "right" if accuracy >= 0.5 else "wrong"
    return (f" <evaluation> The answer is {verdict}. </evaluation>"
            f" <reward> [{_number(accuracy)}, {_number(answer_format)}] </reward>")


@dataclass
class PCLConfig(ObjectiveConfig):
    loss_agg: str = option("token_mean", "official: TRL 0.18's bnpo, a mean over all trained tokens",
                           choices=LOSS_AGGREGATIONS)
    pcl_accuracy: str = option("verifier", "the accuracy target: verifier (the rule checker) or verifree "
                               "(pi(y*|x,z) of the reference after the reasoning)", choices=("verifier", "verifree"))
    pcl_reward_form: str = option("prob", "with pcl_accuracy verifree: the reference's probability (prob) or its "
                                  "mean per-token probability (mean_prob); the log forms do not apply, the "
                                  "accuracy being a probability the self-evaluation predicts",
                                  choices=("prob", "mean_prob"))
    pcl_sft_answer: float = option(0.1, "SFT weight on the reasoning and answer of correct samples", minimum=0)
    pcl_sft_evaluation: float = option(0.1, "SFT weight on the evaluation written from the true rewards",
                                       minimum=0)
    pcl_evaluation_tokens: int = option(48, "most tokens sampled after the answer (the self-evaluation)", minimum=1)


class PCL(Objective):
    name = "pcl"
    Config = PCLConfig
    advantage_eps = 1e-4           # the official (r - mean) / (std + 1e-4)
    prompt_template = PCL_PROMPT_TEMPLATE

    def continuation_tokens(self) -> int:
        return self.config.pcl_evaluation_tokens

    def continue_rollout(self, samples: list[Sample], engine, ctx: StepContext) -> list[Sample]:
        """Samples on after every completion that a stop string ended (the answer), EOS
        forbidden as the first token, up to EOS or pcl_evaluation_tokens."""

        cfg = self.cfg
        todo = []
        for i, s in enumerate(samples):
            if s.finish == "stop":
                if self.length_limit - len(s.prompt_ids) - len(s.ids) > 0:
                    todo.append(i)
                else:
                    s.over_length = True  # no room for the self-evaluation
        within = index_in_group(samples)
        out = list(samples)
        outputs = engine.generate([samples[i].prompt_ids + samples[i].ids for i in todo], 1,
                                  max_new_tokens=self.config.pcl_evaluation_tokens, temperature=cfg.temperature,
                                  seeds=[continuation_seed(cfg.seed, ctx.step, samples[i].group, within[i])
                                         for i in todo], stop=(), min_new_tokens=1)
        for i, (c,) in zip(todo, outputs):
            s = samples[i]
            logprobs = None if s.rollout_logprobs is None or c.logprobs is None else s.rollout_logprobs + c.logprobs
            # The sample keeps the version (and numerics) that sampled its answer: under lag
            # its tokens still get their importance weights (the continuation's are ~1).
            out[i] = replace(s, ids=s.ids + c.ids, finish=c.finish, rollout_logprobs=logprobs, answer_end=len(s.ids))
        return out

    def _parts(self, s: Sample) -> tuple[list[int], list[int]]:
        end = s.answer_end if s.answer_end is not None else len(s.ids)
        return s.ids[:end], s.ids[end:]

    def accuracy(self, samples: list[Sample], answer_ids: list[list[int]], ctx: StepContext) -> torch.Tensor:
        """The accuracy reward of each answer part: the rule checker, or VeriFree's
        pi(y* | x, z) with the reference spliced in after the reasoning."""
        mode = self.config.pcl_accuracy
        if mode == "verifree":
            cfg = self.cfg
            return verifree_scores(ctx.policy, self.tokenizer, [s.prompt_ids for s in samples], answer_ids,
                                   [s.example.answers for s in samples], [s.example.weights for s in samples],
                                   temperature=ctx.temperature, device=ctx.device, marker=cfg.marker, answer_template=cfg.answer_template,
                                   max_seq_len=cfg.max_seq_len or None, token_budget=cfg.micro_batch_tokens,
                                   reward_form=self.config.pcl_reward_form)

        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in answer_ids]
        return verifier_rewards(texts, [list(s.example.answers) for s in samples])

    def score(self, samples: list[Sample], ctx: StepContext) -> torch.Tensor:
        tok = self.tokenizer
        parts = [self._parts(s) for s in samples]
        answer_texts = [tok.decode(a, skip_special_tokens=True) for a, _ in parts]
        post_texts = [tok.decode(p, skip_special_tokens=True) for _, p in parts]
        accuracy = self.accuracy(samples, [a for a, _ in parts], ctx).double()
        # An answer cut at the length limit scores 0 (VeriFree's rule: the spliced
        # reference would otherwise make a half-written answer look right).
        accuracy[torch.tensor([s.answer_end is None and s.truncated for s in samples], dtype=torch.bool)] = 0.0
        answer_format = torch.tensor([pcl_answer_format(t) for t in answer_texts], dtype=torch.float64)
        full_format = torch.tensor([pcl_full_format(a, p) if s.answer_end is not None else 0.0
                                    for a, p, s in zip(answer_texts, post_texts, samples)], dtype=torch.float64)
        predicted = [parse_pcl_reward(p) for p in post_texts]
        consistency = torch.tensor([pcl_consistency([a, f], pred) for a, f, pred in
                                    zip(accuracy.tolist(), answer_format.tolist(), predicted)], dtype=torch.float64)
        for s, truth in zip(samples, zip(accuracy.tolist(), answer_format.tolist())):
            s.scored["pcl_truth"] = truth  # (accuracy, format): the evaluation sequences() teaches
        n, m = len(samples), ctx.metrics
        add_metric(m, "pcl_accuracy", float(accuracy.sum()), n)
        add_metric(m, "pcl_format", float(full_format.sum()), n)
        add_metric(m, "pcl_consistency", float(consistency.sum()), n)
        add_metric(m, "pcl_parsed_frac", float(sum(p is not None for p in predicted)), n)
        add_metric(m, "pcl_predicted_accuracy", sum(p[0] for p in predicted if p), sum(1 for p in predicted if p))
        return accuracy + full_format + consistency

    def sequences(self, samples: list[Sample]) -> TrainSequences:
        """Per sample: the completion as sampled (policy gradient on every token, SFT on
        the answer part weighted by its accuracy), and, when it reached an answer, the
        answer part as context followed by the evaluation written from its true rewards
        and EOS (SFT on those tokens)."""
        eos = self.tokenizer.eos_token_id
        seqs, owner, prefix, answer_rows, kind = [], [], [], [], []
        for i, s in enumerate(samples):
            room = max(0, self.length_limit - len(s.prompt_ids))
            ids = s.ids[:room]
            s.over_length |= len(ids) < len(s.ids)
            answer, _ = self._parts(s)
            seqs.append(Sequence(s.prompt_ids, ids, [], group=s.group))
            owner.append(i), prefix.append(len(ids))
            answer_rows.append(min(len(answer), len(ids)))
            kind.append("sampled")
            if s.answer_end is None:
                continue
            evaluation = self.tokenizer(pcl_evaluation_text(*s.scored["pcl_truth"]),
                                        add_special_tokens=False)["input_ids"]
            context = s.prompt_ids + answer
            if len(context) + len(evaluation) + 1 > self.length_limit:
                s.over_length = True
                continue
            seqs.append(Sequence(context, [], [], group=s.group, post_ids=evaluation + [eos]))
            owner.append(i), prefix.append(0)
            answer_rows.append(0)
            kind.append("evaluation")
        return TrainSequences(seqs, owner, prefix, {"answer_rows": answer_rows, "kind": kind})

    def coefficients(self, mb: MicroBatch, looked, ctx: StepContext):
        """-A on every sampled row, - w_answer * accuracy on the answer part's rows,
        - w_evaluation on the taught evaluation's rows."""
        c = -self.completion_advantages(mb, ctx).cpu()
        roles = mb.batch.roles
        starts = mb.batch.cu_seqlens.tolist()
        w_answer, w_eval = self.config.pcl_sft_answer, self.config.pcl_sft_evaluation
        for b, seq in enumerate(mb.sequences):
            first = starts[b] + len(seq.prompt_ids) - 1  # the row that predicts the first non-prompt token
            if mb.data["kind"][b] == "sampled":
                acc = ctx.samples[int(mb.owner[b])].scored["pcl_truth"][0]
                c[first:first + mb.data["answer_rows"][b]] -= w_answer * acc
            else:
                rows = slice(first, first + len(seq.post_ids))
                c[rows] = torch.where(roles[rows] == ROLE_POST, c[rows] - w_eval, c[rows])
        return c.to(mb.device), None
