"""`RLPRTrainer`: TRL's `GRPOTrainer` with RLPR's reward (docs/algorithms.md).

A trainer and not a reward function, because the reward needs the policy's own
probabilities of the reference (a TRL reward function gets text and ids, not the model)
and a score of every training prompt by the *initial* policy before the first step.

Imports TRL (`pyvf.integrations.trl` imports this module on first use of the class).
"""

from __future__ import annotations

import torch

from pyvf.integrations.trl._common import (
    _INSTALL_HINT, _check_dataset_columns, _closing_text, _references, _score_forward,
    _validate_common,
)
from pyvf.integrations.trl.fused_head import _unwrap_peft, patch_per_token_logps
from pyvf.ops import segment_sum
from pyvf.packing import ROLE_ANSWER, Sequence
from pyvf.rewards import RewardStdFilter, rlpr_rewards
from pyvf.splice import DEFAULT_ANSWER_TEMPLATE, DEFAULT_MARKER, splice_reference

# TRL behind a check, so that a missing TRL fails with the extra to install.
try:
    from trl import GRPOTrainer
except ImportError as exc:
    raise ImportError(f"pyvf.integrations.trl needs TRL: {_INSTALL_HINT}") from exc
from accelerate.utils import gather


class RLPRTrainer(GRPOTrainer):
    """GRPOTrainer with RLPR's reward (docs/algorithms.md): 0.9 * max(0, B - A) + 0.1 * format.

    B: mean probability of the reference's tokens after the sampled reasoning (policy
    at sampling time, one no-grad forward over the spliced sequences); A: the same
    right after the prompt, scored by the initial policy for every training prompt
    when `train()` starts and cached (prompts first seen later, e.g. eval, are scored
    when first seen). A completion without exactly one marker, or cut by the length
    limit before its answer closed, scores 0. With `std_filter` (default), groups
    whose reward std is under half its running average get NaN rewards, which TRL
    treats as unscorable (advantage 0). The loss is GRPOTrainer's: RLPR's setting is
    `GRPOConfig(loss_type="dapo", epsilon=0.2, epsilon_high=0.27, entropy_coef=0.001,
    beta=0.0)`.
    """

    _tag_names = ["trl", "grpo", "pyvf", "rlpr"]

    def __init__(self, model, args=None, train_dataset=None, eval_dataset=None, processing_class=None, *,
                 reward_funcs=None, marker: str = DEFAULT_MARKER,
                 answer_template: str = DEFAULT_ANSWER_TEMPLATE, answer_column: str = "answer",
                 reward_weight: float = 0.9, std_filter: bool = True, backend: str = "auto", **kwargs):
        if reward_funcs:
            raise ValueError("RLPRTrainer computes its own reward; reward_funcs must be None")
        _validate_common("RLPRTrainer", args, kwargs)
        if not 0.0 <= reward_weight <= 1.0:
            raise ValueError(f"reward_weight must be in [0, 1], got {reward_weight}")
        if train_dataset is not None:
            _check_dataset_columns(train_dataset, answer_column, "train_dataset")
        self.marker, self.answer_template, self.answer_column = marker, answer_template, answer_column
        self.reward_weight = reward_weight
        self._closing = _closing_text(answer_template)
        self.no_reasoning_scores: dict[tuple, float] = {}
        self.std_filter = RewardStdFilter(ratio=0.5, decay=0.99) if std_filter else None

        def rlpr(**_):  # named column for TRL's logs; the reward itself is computed in _calculate_rewards
            raise RuntimeError("RLPRTrainer computes the RLPR reward itself")

        super().__init__(model, reward_funcs=[rlpr], args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        patch_per_token_logps(self, backend=backend)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.answer_column not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, self.answer_column]

    def _span_scores(self, seqs: list[Sequence], spans: list[slice]) -> torch.Tensor:
        """Mean probability of each sequence's reference-span answer tokens (no grad)."""
        device = self.accelerator.device
        scores = []
        step = max(1, self.args.per_device_train_batch_size)
        for start in range(0, len(seqs), step):
            chunk, chunk_spans = seqs[start:start + step], spans[start:start + step]
            with torch.no_grad():
                logp, batch = _score_forward(self.model, chunk, self._tokenizer.pad_token_id, device,
                                             _unwrap_peft(self.accelerator.unwrap_model(self.model)))
            in_span = torch.zeros(batch.input_ids.numel(), dtype=torch.bool)
            answer_rows = (batch.roles == ROLE_ANSWER).nonzero().squeeze(1)
            k = 0
            for seq, span in zip(chunk, chunk_spans):
                in_span[answer_rows[k + span.start:k + span.stop]] = True
                k += len(seq.answer_ids)
            in_span = in_span.to(logp.device)
            cu = batch.cu_seqlens.to(logp.device)
            prob = segment_sum(torch.exp(logp.float()), cu, mask=in_span)
            count = segment_sum(torch.ones_like(logp, dtype=torch.float32), cu, mask=in_span)
            scores.append((prob / count.clamp(min=1)).double().cpu())
        return torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)

    def _without_reasoning(self, prompt_ids_list, refs_list) -> list[list[float]]:
        """Cached score A per (prompt, reference); scores the missing ones now."""
        keys, missing = [], {}
        for p_ids, refs in zip(prompt_ids_list, refs_list):
            row = []
            for ref in refs:
                key = (tuple(p_ids), ref)
                row.append(key)
                if key not in self.no_reasoning_scores and key not in missing:
                    # The rendered answer right after the prompt, no reasoning (as pyvf's own RLPR objective).
                    answer_ids, span = self._rendered_answer(ref)
                    missing[key] = (Sequence(list(p_ids), [], answer_ids, group=0), span)
            keys.append(row)
        if missing:
            items = list(missing.items())
            scores = self._span_scores([s for _, (s, _) in items], [sp for _, (_, sp) in items])
            for (key, _), score in zip(items, scores.tolist()):
                self.no_reasoning_scores[key] = score
        return [[self.no_reasoning_scores[k] for k in row] for row in keys]

    def _rendered_answer(self, ref: str) -> tuple[list[int], slice]:
        marker_ids = self._tokenizer(self.marker, add_special_tokens=False)["input_ids"]
        spliced = splice_reference(self._tokenizer, marker_ids, ref, marker=self.marker,
                                   answer_template=self.answer_template)
        return spliced.answer_ids, spliced.reference_span

    def score_training_prompts(self, dataset=None) -> int:
        """Scores A for every (prompt, reference) of `dataset` (default the training set)
        with the current policy; `train()` calls it before the first step. Returns the
        number of pairs scored."""
        dataset = self.train_dataset if dataset is None else dataset
        before = len(self.no_reasoning_scores)
        step = max(1, self.args.per_device_train_batch_size)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(dataset), step):
                rows = [dataset[i] for i in range(start, min(start + step, len(dataset)))]
                prompt_ids, _, _ = self._tokenize_prompts([r["prompt"] for r in rows])
                self._without_reasoning(prompt_ids, [_references(r, self.answer_column) for r in rows])
        finally:
            self.model.train(was_training)
        return len(self.no_reasoning_scores) - before

    def train(self, *args, **kwargs):
        if self.train_dataset is not None and hasattr(self.train_dataset, "__len__"):
            self.score_training_prompts()
        return super().train(*args, **kwargs)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        device = self.accelerator.device
        prompt_ids_list, _, _ = self._tokenize_prompts(prompts)
        refs_list = [_references(x, self.answer_column) for x in inputs]
        without = self._without_reasoning(prompt_ids_list, refs_list)
        eos_and_pad = {*self.eos_token_ids, self._tokenizer.pad_token_id}
        seqs, spans, owner, weight, base = [], [], [], [], []
        for i, (p_ids, c_ids, refs) in enumerate(zip(prompt_ids_list, completion_ids_list, refs_list)):
            text = self._tokenizer.decode(c_ids, skip_special_tokens=False)
            ok = text.count(self.marker) == 1
            if ok and (not c_ids or c_ids[-1] not in eos_and_pad):
                ok = bool(self._closing) and self._closing in text[text.find(self.marker):]
            if not ok:
                continue
            for sp, a in zip(splice_reference(self._tokenizer, c_ids, refs, marker=self.marker,
                                              answer_template=self.answer_template), without[i]):
                seqs.append(Sequence(list(p_ids), sp.reasoning_ids, sp.answer_ids, group=0))
                spans.append(sp.reference_span)
                owner.append(i)
                weight.append(1.0 / len(refs))
                base.append(a)
        rewards = torch.zeros(len(prompts), dtype=torch.float64)
        if seqs:
            with_reasoning = self._span_scores(seqs, spans)
            per_ref = rlpr_rewards(with_reasoning, torch.tensor(base, dtype=torch.float64),
                                   torch.ones(len(seqs), dtype=torch.float64), weight=self.reward_weight)
            rewards.index_add_(0, torch.tensor(owner), torch.tensor(weight, dtype=torch.float64) * per_ref)
        rewards = gather(rewards.float().to(device))
        mode = "train" if self.model.training else "eval"
        if self.std_filter is not None and mode == "train":
            g = self.num_generations
            groups = torch.arange(rewards.numel(), device=rewards.device) // g
            keep = self.std_filter(rewards.cpu(), groups.cpu()).to(rewards.device)
            self._metrics[mode]["rlpr/kept_groups"].append(keep.float().mean().item())
            rewards = torch.where(keep, rewards, torch.full_like(rewards, float("nan")))
        return rewards.unsqueeze(1)
