"""Self-rated rubric reward ("reverse incentive"; docs/algorithms.md): for tasks with
criteria but no reference answer, the model writes its answer and then rates it against
a rubric, `<rating>criterion: k; ...</rating>` (pyvf.verify.rubric); the rating, scaled
to [0, 1], is the reward. An unparsable rating scores 0 and is counted.

Against self-flattery:
- a ranking term: the reward adds `ranking_weight` x (wins - losses) / (G - 1) of the
  candidate's rating against the others of its group, so rating every candidate 5
  earns nothing over rating them honestly, and only the order among candidates moves
  the advantages beyond the absolute rating;
- the rater (`rater`) may be the policy itself rating inside its completion ("self"),
  a frozen copy of the starting policy ("frozen") or a slowly updated copy ("proxy":
  proxy <- proxy_alpha proxy + (1 - proxy_alpha) policy every proxy_sync_every
  steps); a copy rates by continuing the prompt and the answer, the same context the
  policy rates itself in.
The staging the literature describes: learn to rate on labelled ratings (the shipped
model's warm-up), RL the writer against the frozen rater (`rater: frozen`), then tune
both together (`rater: self` or `proxy`).

When the task has a rule-based true rating (the built-in open-ended task), the
agreement of the reward's ranking with the true one is logged (`ranking_agreement`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from pyvf.data import openended
from pyvf.objectives.base import Objective, ObjectiveConfig, Sample, StepContext, add_metric
from pyvf.options import option
from pyvf.runtime import distributed
from pyvf.runtime.model import load_weights
from pyvf.verify.rubric import SelfRubric as RubricVerifier
from pyvf.verify.rubric import answer_part, load_rubric, model_rater


def ranking_term(ratings: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """[n] (wins - losses) / (group size - 1) of each rating against the others of its
    group (ties neither win nor lose); 0 in a group of one."""
    if ratings.shape != groups.shape or ratings.dim() != 1:
        raise ValueError(f"ratings and groups must be 1-D of the same length, got {tuple(ratings.shape)} and "
                         f"{tuple(groups.shape)}")
    same = groups[:, None] == groups[None, :]
    sign = torch.sign(ratings[:, None] - ratings[None, :]).double()
    size = same.sum(1).double()
    return torch.where(size > 1, (sign * same).sum(1) / (size - 1).clamp(min=1), torch.zeros_like(size))


def ranking_agreement(ratings: torch.Tensor, truth: torch.Tensor, groups: torch.Tensor) -> tuple[float, int]:
    """(agreeing pairs, pairs): over the pairs of a group whose true scores differ, how
    many the ratings order the same way (a tie in the ratings counts half)."""
    n = groups.numel()
    same = (groups[:, None] == groups[None, :]) & torch.ones(n, n, dtype=torch.bool).triu(1)
    differ = same & (truth[:, None] != truth[None, :])
    order = torch.sign(ratings[:, None] - ratings[None, :]) * torch.sign(truth[:, None] - truth[None, :])
    agree = torch.where(order > 0, 1.0, torch.where(order == 0, 0.5, 0.0))
    return float((agree * differ).sum()), int(differ.sum())


@dataclass
class SelfRubricConfig(ObjectiveConfig):
    rater: str = option("self", "who rates: self (inside its own completion), frozen (a copy of the starting "
                        "model) or proxy (a copy that follows the policy slowly)", choices=("self", "frozen", "proxy"))
    ranking_weight: float = option(0.5, "weight of the within-group ranking term", minimum=0)
    proxy_sync_every: int = option(100, "rater proxy: rater <- alpha rater + (1 - alpha) policy every N steps",
                                   minimum=1)
    proxy_alpha: float = option(0.9, "alpha of the rater proxy's update", minimum=0, maximum=1)


class SelfRubric(Objective):
    name = "selfrubric"
    Config = SelfRubricConfig
    advantage_estimator = "grpo"
    needs_references = False
    prompt_template = openended.PROMPT_TEMPLATE

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.rubric = load_rubric(cfg.rubric or openended.RUBRIC)
        # The built-in task can check the ranking against its rule-based true rating.
        self.truth = openended.true_score if cfg.data == "openended" else None
        self.rater = None

    def attach(self, policy) -> None:
        rate = None
        if self.config.rater != "self":
            self.rater = copy.deepcopy(policy.model).eval().requires_grad_(False)
            rate = model_rater(self.rater, self.tokenizer, max_new_tokens=self.cfg.max_new_tokens)
        # The rating as pyvf.verify reads it: from the completion itself, or from the
        # rater copy's continuation of prompt + answer + newline.
        self.verifier = RubricVerifier(self.rubric, rate=rate)

    @torch.no_grad()
    def _sync_rater(self, ctx: StepContext) -> None:
        alpha = self.config.proxy_alpha
        full = distributed.full_model_state(ctx.policy, ctx.world > 1)
        for name, p in self.rater.named_parameters():  # tied weights once
            if name in full:
                p.mul_(alpha).add_(full[name].to(p.device, p.dtype), alpha=1 - alpha)

    def score(self, samples: list[Sample], ctx: StepContext) -> torch.Tensor:
        tok = self.tokenizer
        if self.config.rater == "proxy" and ctx.step > 1 and (ctx.step - 1) % self.config.proxy_sync_every == 0:
            self._sync_rater(ctx)
        prompts = [tok.decode(s.prompt_ids, skip_special_tokens=False) for s in samples]
        completions = [tok.decode(s.ids, skip_special_tokens=True) for s in samples]
        self.verifier.reset_stats()
        ratings = torch.tensor(self.verifier(prompts, completions) if samples else [], dtype=torch.float64)
        unparsable = self.verifier.stats.get("unparsable", 0)
        groups = torch.tensor([s.group for s in samples], dtype=torch.long)
        rank = ranking_term(ratings, groups)
        n, m = len(samples), ctx.metrics
        add_metric(m, "rating_mean", float(ratings.sum()), n)
        add_metric(m, "rating_unparsable_frac", unparsable, n)
        if self.truth is not None:
            truth = torch.tensor([self.truth(answer_part(c)) for c in completions], dtype=torch.float64)
            add_metric(m, "true_score", float(truth.sum()), n)
            add_metric(m, "ranking_agreement", *ranking_agreement(ratings, truth, groups))
        return ratings + self.config.ranking_weight * rank

    # A frozen rater is the starting model, which attach() copies again on resume; only
    # the proxy moves and is saved.
    def state_dict(self) -> dict:
        if self.config.rater != "proxy":
            return {}
        return {"rater": {k: v.detach().cpu() for k, v in self.rater.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        if self.config.rater != "proxy":
            return
        if "rater" not in state:
            raise ValueError("the checkpoint has no rater weights: was it written with another rater or objective?")

        load_weights(self.rater, state["rater"])
