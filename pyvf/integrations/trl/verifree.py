"""`VeriFreeTrainer`: TRL's `GRPOTrainer` with VeriFree's objective (docs/algorithms.md).

Same `GRPOConfig`, a dataset with a `prompt` column and an `answer` column (one
reference, or a list of equivalent ones), no reward functions. Each sampled completion
is spliced token-exactly (`pyvf.splice`: the sampled ids before the marker are kept),
and ONE forward with gradient over [prompt | reasoning | reference answer] gives both
the reward pi(answer | prompt, reasoning) and the loss (`pyvf.losses.verifree_loss`
on the packed spliced batch, log-probs from `pyvf.ops.token_logprobs`).

Imports TRL (`pyvf.integrations.trl` imports this module on first use of the class).
"""

from __future__ import annotations

import warnings

import torch

from pyvf.integrations.trl._common import (
    _INSTALL_HINT, _check_dataset_columns, _closing_text, _left_pad, _references, _right_pad, _row,
    _score_forward, _validate_common,
)
from pyvf.integrations.trl.fused_head import _unwrap_peft, patch_per_token_logps
from pyvf.losses import verifree_loss
from pyvf.packing import Sequence
from pyvf.splice import DEFAULT_ANSWER_TEMPLATE, DEFAULT_MARKER
from pyvf.verify.verifree import LOG_FORMS, check_reward_form, splice_answers

# TRL behind a check, so that a missing TRL fails with the extra to install.
try:
    from trl import GRPOTrainer
except ImportError as exc:
    raise ImportError(f"pyvf.integrations.trl needs TRL: {_INSTALL_HINT}") from exc
from accelerate.utils import gather, gather_object
from trl.trainer.utils import split_tensor_dict


class VeriFreeTrainer(GRPOTrainer):
    """GRPOTrainer with the single-pass VeriFree objective (see the module docstring).

    Extra keyword arguments: `marker` ("<answer"), `answer_template`
    ("> \\\\boxed{{{ref}}} </answer>"), `answer_column` ("answer"), `backend` (of
    `token_logprobs`), `reward_form` ("prob"; logprob, mean_logprob or mean_prob: the
    reward forms of `pyvf.verify.verifree`, the log forms scoring every completion). GRPO's
    own loss settings (loss_type, epsilon, scale_rewards, importance sampling, entropy
    bonus) do not apply: VeriFree's loss is -(A_i * log pi(reasoning_i) + R_i * log
    pi(answer_i)), mean over completions, with RLOO advantages A_i and rewards R_i =
    pi(answer_i | prompt, reasoning_i) (the answer term -w dR/dlog pi per token in another
    form).
    """

    _tag_names = ["trl", "grpo", "pyvf", "verifree"]

    def __init__(self, model, args=None, train_dataset=None, eval_dataset=None, processing_class=None, *,
                 reward_funcs=None, marker: str = DEFAULT_MARKER,
                 answer_template: str = DEFAULT_ANSWER_TEMPLATE, answer_column: str = "answer",
                 backend: str = "auto", reward_form: str = "prob", **kwargs):
        if reward_funcs:
            raise ValueError("VeriFreeTrainer computes its own reward (the policy's probability of the "
                             "reference answer); reward_funcs must be None")
        _validate_common("VeriFreeTrainer", args, kwargs)
        if not isinstance(marker, str) or not marker:
            raise ValueError(f"marker must be a non-empty string, got {marker!r}")
        if not isinstance(answer_template, str) or answer_template.count("{ref}") != 1:
            raise ValueError(f"answer_template must contain {{ref}} exactly once, got {answer_template!r}")
        if train_dataset is not None:
            _check_dataset_columns(train_dataset, answer_column, "train_dataset")
        if args is not None:
            self._check_verifree_args(args)
        self.marker, self.answer_template, self.answer_column = marker, answer_template, answer_column
        self.reward_form = check_reward_form(reward_form)
        self._closing = _closing_text(answer_template)

        def verifree(**_):  # TRL requires a reward source; it also names the reward column of the logs
            raise RuntimeError("VeriFreeTrainer computes the VeriFree reward in its loss forward")

        super().__init__(model, reward_funcs=[verifree], args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        if args is None:
            self._check_verifree_args(self.args)
        # The answer tokens are spliced in, not sampled: there is no sampling log-prob to correct with.
        self.vllm_importance_sampling_correction = False
        patch_per_token_logps(self, backend=backend)

    @staticmethod
    def _check_verifree_args(args):
        g = args.num_generations
        if args.num_iterations != 1:
            raise ValueError(f"VeriFree is on-policy (one update per rollout, the reward comes from the "
                             f"gradient forward); num_iterations must be 1, got {args.num_iterations}")
        if g is None or g < 2:
            raise ValueError(f"num_generations must be >= 2 (RLOO needs the other samples of a group), got {g}")
        if args.per_device_train_batch_size % g:
            raise ValueError(
                f"per_device_train_batch_size ({args.per_device_train_batch_size}) must be a multiple of "
                f"num_generations ({g}): the single-pass reward needs every sample of a group in the same "
                f"forward")
        g_eval = args.num_generations_eval or g
        if args.per_device_eval_batch_size % g_eval:
            raise ValueError(f"per_device_eval_batch_size ({args.per_device_eval_batch_size}) must be a multiple "
                             f"of num_generations_eval ({g_eval})")
        if args.use_vllm and args.vllm_importance_sampling_correction:
            warnings.warn("VeriFreeTrainer: vllm_importance_sampling_correction is switched off (the spliced "
                          "answer tokens have no sampling log-probs)", stacklevel=3)
        ignored = [name for name, on in (
            ("entropy_coef", args.entropy_coef != 0.0 or args.use_adaptive_entropy),
            ("top_entropy_quantile", args.top_entropy_quantile < 1.0),
            ("off_policy_mask_threshold", args.off_policy_mask_threshold is not None)) if on]
        if ignored:
            warnings.warn(f"VeriFreeTrainer ignores {', '.join(ignored)} (VeriFree's loss has no such term)",
                          stacklevel=3)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.answer_column not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, self.answer_column]

    def _splice(self, prompt_ids_list, completion_ids_list, refs_list, device):
        eos_and_pad = {*self.eos_token_ids, self._tokenizer.pad_token_id}
        prompts, reasoning, answers, weights, valid = [], [], [], [], []
        for p_ids, c_ids, refs in zip(prompt_ids_list, completion_ids_list, refs_list, strict=True):
            every = self.reward_form in LOG_FORMS  # finite for any reasoning: every completion is scored
            spliced, _ = splice_answers(self._tokenizer, c_ids, refs, marker=self.marker,
                                        answer_template=self.answer_template, every=every)
            ok = spliced[0].found
            if ok and not every and (not c_ids or c_ids[-1] not in eos_and_pad):
                # Cut by the length limit: counts only if the answer was closed before the cut.
                text = self._tokenizer.decode(c_ids, skip_special_tokens=False)
                ok = bool(self._closing) and self._closing in text[text.find(self.marker):]
            truncated_no_answer = self.mask_truncated_completions and not ok and c_ids \
                and c_ids[-1] not in eos_and_pad
            prompts.append(list(p_ids))
            reasoning.append([] if truncated_no_answer else spliced[0].reasoning_ids)
            answers.append([s.answer_ids for s in spliced] if ok else [])
            weights.append([1.0 / len(spliced)] * len(spliced) if ok else [])
            valid.append(ok)
        pad = self._tokenizer.pad_token_id
        k = max(1, max(len(a) for a in answers))
        width = max([len(x) for a in answers for x in a], default=0)
        answer_ids = torch.full((len(answers), k, width), pad, dtype=torch.long)
        answer_mask = torch.zeros((len(answers), k, width), dtype=torch.long)
        answer_weights = torch.zeros((len(answers), k))
        for i, (a, w) in enumerate(zip(answers, weights)):
            for j, (ids, wj) in enumerate(zip(a, w)):
                answer_ids[i, j, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                answer_mask[i, j, :len(ids)] = 1
                answer_weights[i, j] = wj
        prompt_ids, prompt_mask = _left_pad(prompts, pad, device)
        reasoning_ids, reasoning_mask = _right_pad(reasoning, pad, device)
        return {
            "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "reasoning_ids": reasoning_ids, "reasoning_mask": reasoning_mask,
            "answer_ids": answer_ids.to(device), "answer_mask": answer_mask.to(device),
            "answer_weights": answer_weights.to(device),
            "found": torch.tensor(valid, device=device),
        }

    def _generate_and_score_completions(self, inputs):
        device = self.accelerator.device
        mode = "train" if self.model.training else "eval"
        if any(("image" in x or "images" in x) for x in inputs):
            raise ValueError("VeriFreeTrainer does not support image inputs")
        prompts = [x["prompt"] for x in inputs]
        refs = [_references(x, self.answer_column) for x in inputs]
        prompt_ids_list, completion_ids_list, _, completions, *_ = self._generate(prompts)
        batch = self._splice(prompt_ids_list, completion_ids_list, refs, device)
        g = self.num_generations if mode == "train" else self.num_generations_eval
        n = len(prompts)
        if n % g:
            raise ValueError(f"a process got {n} samples, not whole groups of {g}: make the per-device batch "
                             f"size a multiple of num_generations")
        offset = self.accelerator.process_index * (n // g)
        batch["group"] = (torch.arange(n, device=device) // g + offset).long()
        found = gather(batch["found"].float())
        self._metrics[mode]["verifree/marker_found"].append(found.mean().item())
        self._logs["prompt"].extend(gather_object(prompts))
        self._logs["completion"].extend(gather_object(completions))
        return batch

    def _prepare_inputs(self, generation_batch):
        mode = "train" if self.model.training else "eval"
        if mode == "eval":
            return self._generate_and_score_completions(generation_batch)
        if self._step % self.args.steps_per_generation == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            # Shuffle whole groups, never samples: each micro-batch must hold all G samples of its groups.
            g = self.num_generations
            order = (torch.randperm(batch["group"].numel() // g)[:, None] * g + torch.arange(g)).flatten()
            order = order.to(batch["group"].device)
            batch = {k: v[order] for k, v in batch.items()}
            self._buffered_inputs = split_tensor_dict(batch, self.args.steps_per_generation)
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    def spliced_sequences(self, inputs) -> tuple[list[Sequence], torch.Tensor, torch.Tensor]:
        """The packed-batch view of a micro-batch: one Sequence per (completion,
        reference), the completion index and the reference weight of each."""
        seqs, completion, weights = [], [], []
        for i in range(inputs["prompt_ids"].shape[0]):
            prompt = _row(inputs["prompt_ids"][i], inputs["prompt_mask"][i])
            reasoning = _row(inputs["reasoning_ids"][i], inputs["reasoning_mask"][i])
            group = int(inputs["group"][i])
            refs = [(j, float(w)) for j, w in enumerate(inputs["answer_weights"][i].tolist()) if w > 0]
            if not refs:
                seqs.append(Sequence(prompt, reasoning, [], group=group))
                completion.append(i)
                weights.append(1.0)
            for j, w in refs:
                answer = _row(inputs["answer_ids"][i, j], inputs["answer_mask"][i, j])
                seqs.append(Sequence(prompt, reasoning, answer, group=group))
                completion.append(i)
                weights.append(w)
        return seqs, torch.tensor(completion), torch.tensor(weights)

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        device = inputs["prompt_ids"].device
        seqs, completion, weights = self.spliced_sequences(inputs)
        logp, batch = _score_forward(model, seqs, self._tokenizer.pad_token_id, device,
                                     _unwrap_peft(self.accelerator.unwrap_model(self.model)))
        dev = logp.device
        out = verifree_loss(logp, batch.roles.to(dev), batch.cu_seqlens.to(dev), batch.groups.to(dev),
                            completion=completion.to(dev), weights=weights.to(dev), reward_form=self.reward_form)
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        rewards = gather(out.rewards.detach().float())
        advantages = gather(out.advantages.detach().float())
        m = self._metrics[mode]
        m["reward"].append(rewards.mean().item())
        m["reward_std"].append(rewards.std().item() if rewards.numel() > 1 else 0.0)
        m["rewards/verifree/mean"].append(rewards.mean().item())
        m["verifree/reasoning_length"].append(gather(out.reasoning_len.float()).mean().item())
        m["verifree/answer_length"].append(gather(out.answer_len.float()).mean().item())
        self._logs["rewards"]["verifree"].extend(rewards.tolist())
        self._logs["advantages"].extend(advantages.tolist())
        return out.loss / normalizer
