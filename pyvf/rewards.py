"""The reward formulas of each method, importable from one place for use in another
trainer. Each lives with its method in pyvf/objectives/ (one file per method);
docs/algorithms.md states them, their defaults and the official code each was checked
against."""

from pyvf.objectives.base import group_stds
from pyvf.objectives.nover import (
    k3_kl, k3_kl_grad, nover_answer_block, nover_length_norm, nover_perplexity, nover_rewards,
)
from pyvf.objectives.pcl import parse_pcl_reward, pcl_consistency, pcl_consistency_rewards
from pyvf.objectives.rlpr import (
    RLPR_FORMAT_WEIGHT, RewardStdFilter, apply_repetition_penalty, count_markers, repetition_penalty, rlpr_format_ok,
    rlpr_rewards, rlpr_score, rlpr_scoreable,
)
from pyvf.objectives.verifier import verifier_rewards

__all__ = [
    "RLPR_FORMAT_WEIGHT", "RewardStdFilter", "apply_repetition_penalty", "count_markers", "group_stds", "k3_kl",
    "k3_kl_grad", "nover_answer_block", "nover_length_norm", "nover_perplexity", "nover_rewards", "parse_pcl_reward",
    "pcl_consistency", "pcl_consistency_rewards", "repetition_penalty", "rlpr_format_ok", "rlpr_rewards",
    "rlpr_score", "rlpr_scoreable", "verifier_rewards",
]
