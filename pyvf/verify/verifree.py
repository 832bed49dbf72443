"""`verifree`: the VeriFree reward as a verifier, pi(y* | x, z) (docs/algorithms.md: VeriFree, VeriFree+).

Each completion is cut at the first answer marker and each reference, rendered with the
answer template, is appended (`pyvf.splice.splice_reference`, the defaults of
`pyvf.splice`, also training's); one no-grad forward of the model scores the appended
answer tokens (`pyvf.runtime.policy.score_rows`, packed). The score is
sum_k w_k exp(sum of the answer's log-probs), weights uniform over the references.
A completion without the marker scores 0, and a reference whose spliced sequence is
longer than `max_seq_len` adds 0 (counted as `no_marker` / `too_long`), as in training.

`reward_form` (docs/algorithms.md, "Likelihood rewards") picks what of the reference's
answer-token log-probs l_1..l_L is the reward: `prob` exp(sum l) (VeriFree, the default),
`logprob` sum l, `mean_logprob` sum l / L, `mean_prob` mean exp(l_t) (RLPR's score
without its other parts). The log forms are finite for any reasoning, so they score every
completion: one without the marker gets it appended, and one too long for `max_seq_len`
keeps the start of its reasoning that leaves room for the answer.
The scoring model is the policy (`policy=`, a `pyvf.runtime.policy.Policy`) or any causal
LM given as `model=` with its tokenizer (a frozen copy, a larger model).

Prompts and completions are tokenized as they are, without special tokens (a prompt
rendered with a chat template holds its own); `prompt_special_tokens=True` puts the
tokenizer's leading special tokens (a base model's BOS) in front of each prompt. A
completion cut at the length limit cannot be told from its text: leave it out, or
score it 0 yourself, as the VeriFree objective does.
"""

from __future__ import annotations

import torch

from pyvf.chat import encode_with_leading_specials
from pyvf.packing import Sequence
from pyvf.runtime.policy import Policy, score_rows
from pyvf.splice import DEFAULT_ANSWER_TEMPLATE, DEFAULT_MARKER, splice_reference
from pyvf.verify.base import BaseVerifier, check_batch


REWARD_FORMS = ("prob", "logprob", "mean_logprob", "mean_prob")
# Forms finite for any reasoning: every completion gets the reference (never 0 for "no
# answer", which would be the best log-probability there is).
LOG_FORMS = ("logprob", "mean_logprob")


def check_reward_form(form: str) -> str:
    if form not in REWARD_FORMS:
        raise ValueError(f"reward_form must be one of {', '.join(REWARD_FORMS)}, got {form!r}")
    return form


def reference_rewards(form: str, logprobs: torch.Tensor, index: torch.Tensor, n: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(reward [n], d_reward [R]) of n sequences from their reference answer rows'
    log-probs `logprobs` [R] (index [R]: each row's sequence), float64: the reward in
    `form` (module docstring) and its derivative with respect to each row's log-prob, the
    weight of that row's log-likelihood gradient: prob exp(sum l) (the reward itself),
    logprob 1, mean_logprob 1 / L, mean_prob exp(l_t) / L. A sequence without rows has
    reward 0."""
    check_reward_form(form)
    lp = logprobs.double()
    index = index.to(lp.device)
    zeros = torch.zeros(n, dtype=torch.float64, device=lp.device)
    length = zeros.index_add(0, index, torch.ones_like(lp))
    total = zeros.index_add(0, index, lp)
    inv_len = 1.0 / length.clamp(min=1)
    if form == "prob":
        reward = torch.where(length > 0, torch.exp(total), zeros)
        return reward, reward[index]
    if form == "logprob":
        return total, torch.ones_like(lp)
    if form == "mean_logprob":
        return total * inv_len, inv_len[index]
    p = torch.exp(lp)
    return zeros.index_add(0, index, p) * inv_len, p * inv_len[index]


def splice_answers(tokenizer, ids: list[int], references: list[str], *, marker: str, answer_template: str,
                   every: bool = False):
    """(splice_reference's results, whether the completion wrote the marker); with
    `every` (the log forms, JEPO) a completion without the marker is spliced too, the
    marker appended, so that every completion is scored."""
    spliced = splice_reference(tokenizer, list(ids), list(references), marker=marker,
                               answer_template=answer_template)
    if spliced[0].found or not every:
        return spliced, spliced[0].found
    tail = tokenizer(marker, add_special_tokens=False)["input_ids"]
    return splice_reference(tokenizer, list(ids) + list(tail), list(references), marker=marker,
                            answer_template=answer_template), False


def fit_reasoning(prompt_len: int, reasoning: list[int], answer: list[int], limit: int | None, every: bool):
    """(reasoning, answer, cut) within `limit` tokens: with `every` (the log forms, JEPO)
    the start of the reasoning that leaves room for the answer; otherwise the answer is
    dropped (reward 0)."""
    if limit is None or prompt_len + len(reasoning) + len(answer) <= limit:
        return reasoning, answer, False
    if every:
        return reasoning[:max(0, limit - prompt_len - len(answer))], answer, True
    return reasoning[:max(0, limit - prompt_len)], [], True


@torch.no_grad()
def verifree_scores(policy, tokenizer, prompt_ids: list[list[int]], completions: list[list[int]],
                    references: list[list[str]], weights: list[list[float]], *, temperature: float,
                    device: torch.device, marker: str, answer_template: str, max_seq_len: int | None,
                    token_budget: int, counts: dict | None = None, reward_form: str = "prob") -> torch.Tensor:
    """sum_k w_k R(y*_k | x, z) of each completion z (token ids, sampled after
    prompt_ids) without gradients, R the reward in `reward_form` (pi(y*_k | x, z) by
    default): the reasoning through the marker, each reference spliced after it, scored
    by the policy. prob and mean_prob: 0 without the marker, and a reference whose
    sequence is over max_seq_len adds 0 (as in training); the log forms score every
    completion (module docstring). `counts`, if given, gains `no_marker` and `too_long`.
    Collective under torchrun: every rank calls it at the same point."""
    check_reward_form(reward_form)
    if not len(prompt_ids) == len(completions) == len(references) == len(weights):
        raise ValueError(f"prompt_ids, completions, references and weights must have the same length, got "
                         f"{len(prompt_ids)}, {len(completions)}, {len(references)} and {len(weights)}")
    counts = {} if counts is None else counts
    seqs, owner, seq_weights = [], [], []
    for i, (prompt, ids, refs, ws) in enumerate(zip(prompt_ids, completions, references, weights)):
        every = reward_form in LOG_FORMS
        spliced, marked = splice_answers(tokenizer, ids, refs, marker=marker, answer_template=answer_template,
                                         every=every)
        if not marked:
            counts["no_marker"] = counts.get("no_marker", 0) + 1
        if not spliced[0].found:
            continue
        for sp, w in zip(spliced, ws):
            reasoning, answer, cut = fit_reasoning(len(prompt), sp.reasoning_ids, sp.answer_ids, max_seq_len, every)
            if cut:
                counts["too_long"] = counts.get("too_long", 0) + 1
            if not answer:
                continue
            seqs.append(Sequence(list(prompt), reasoning, answer, group=0))
            owner.append(i)
            seq_weights.append(w)
    logprobs = score_rows(policy, seqs, token_budget, temperature=temperature, device=device)
    rows = [lp[-len(seq.answer_ids):] for seq, lp in zip(seqs, logprobs)]
    index = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor([len(r) for r in rows], dtype=torch.long))
    reward, _ = reference_rewards(reward_form, torch.cat(rows) if rows else torch.zeros(0, dtype=torch.float64),
                                  index, len(rows))
    return torch.zeros(len(completions), dtype=torch.float64).index_add_(
        0, torch.tensor(owner, dtype=torch.long), torch.tensor(seq_weights, dtype=torch.float64) * reward)


class VerifreeVerifier(BaseVerifier):
    """stats: `scored`, `no_marker` (completions), `too_long` (spliced references)."""

    name = "verifree"

    def __init__(self, model=None, tokenizer=None, *, policy=None, marker: str | None = None,
                 answer_template: str | None = None, temperature: float = 1.0, max_seq_len: int | None = None,
                 token_budget: int = 8192, prompt_special_tokens: bool = False, reward_form: str = "prob"):
        super().__init__()
        self.reward_form = check_reward_form(reward_form)
        if isinstance(model, Policy):
            model, policy = None, model
        if (model is None) == (policy is None):
            raise ValueError("model: the verifree verifier scores with one model; give model= (a causal LM) or policy= "
                             "(a pyvf.runtime.policy.Policy), not both or neither")
        if tokenizer is None:
            raise ValueError("tokenizer: the verifree verifier needs the scoring model's tokenizer")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget < 1:
            raise ValueError(f"token_budget must be a positive int, got {token_budget!r}")
        self.policy = policy if policy is not None else Policy(model)
        self.tokenizer = tokenizer
        self.marker = DEFAULT_MARKER if marker is None else marker
        self.answer_template = DEFAULT_ANSWER_TEMPLATE if answer_template is None else answer_template
        if not isinstance(self.marker, str) or not self.marker:
            raise ValueError(f"marker must be a non-empty string, got {self.marker!r}")
        if not isinstance(self.answer_template, str) or self.answer_template.count("{ref}") != 1:
            raise ValueError(f"answer_template must contain {{ref}} exactly once, got {self.answer_template!r}")
        if max_seq_len is None:
            max_seq_len = getattr(getattr(self.policy.model, "config", None), "max_position_embeddings", None)
        if max_seq_len is not None and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int)
                                        or max_seq_len < 2):
            raise ValueError(f"max_seq_len must be an int >= 2 or None, got {max_seq_len!r}")
        self.max_seq_len = max_seq_len
        self.temperature = float(temperature)
        self.token_budget = token_budget
        self.prompt_special_tokens = prompt_special_tokens

    def _prompt_ids(self, prompt: str) -> list[int]:
        if self.prompt_special_tokens:
            return encode_with_leading_specials(self.tokenizer, prompt)
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def __call__(self, prompts, completions, references=None) -> list[float]:
        prompts, completions, references = check_batch(prompts, completions, references, need_references=True,
                                                       who=self.name)
        prompt_cache: dict[str, list[int]] = {}
        prompt_ids = []
        for i, prompt in enumerate(prompts):
            if prompt not in prompt_cache:
                prompt_cache[prompt] = self._prompt_ids(prompt)
            if not prompt_cache[prompt]:
                raise ValueError(f"prompts[{i}] is empty: the answer is scored after a prompt")
            prompt_ids.append(prompt_cache[prompt])
        references = [[r for r in refs if r.strip()] for refs in references]
        weights = [[1.0 / len(refs)] * len(refs) for refs in references]
        weight = self.policy.model.get_output_embeddings().weight
        counts: dict = {}
        scores = verifree_scores(self.policy, self.tokenizer, prompt_ids,
                                 [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions],
                                 references, weights, temperature=self.temperature,
                                 device=weight.device, marker=self.marker, answer_template=self.answer_template,
                                 max_seq_len=self.max_seq_len, token_budget=self.token_budget, counts=counts,
                                 reward_form=self.reward_form)
        for key, n in counts.items():
            self.count(key, n)
        self.count("scored", len(completions))
        return scores.tolist()


__all__ = ["REWARD_FORMS", "VerifreeVerifier", "reference_rewards", "verifree_scores"]
