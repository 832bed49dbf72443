"""Post-completion learning (PCL, arXiv 2507.20252, xfey/Post-Completion-Learning;
docs/algorithms.md): after its answer the model writes a self-evaluation and a
predicted reward, trained toward the true rewards. This file holds its reward
formulas, checked against the official code; the objective itself (training
sequences past the answer, the SFT terms) is not wired into the trainer yet.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Sequence

import torch


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


def pcl_consistency(ground_truth: Sequence[float], predicted: Sequence[float] | None) -> float:
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


def pcl_consistency_rewards(ground_truth: Sequence[Sequence[float]], completions: list[str]) -> torch.Tensor:
    """`pcl_consistency` of each completion's parsed <reward> block against its ground-truth
    rewards (accuracy, format of the think-answer part)."""
    if len(ground_truth) != len(completions):
        raise ValueError(f"ground_truth and completions must have the same length, got {len(ground_truth)} "
                         f"and {len(completions)}")
    return torch.tensor([pcl_consistency(g, parse_pcl_reward(c)) for g, c in zip(ground_truth, completions)],
                        dtype=torch.float64)
