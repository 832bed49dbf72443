"""pyvf inside TRL (tested with trl 1.16.0, the pin of the `pyvf[trl]` extra).

- `VeriFreeTrainer`: TRL's `GRPOTrainer` with VeriFree's objective (docs/algorithms.md).
  Same `GRPOConfig`, a dataset with a `prompt` column and an `answer` column (one
  reference, or a list of equivalent ones), no reward functions. Each sampled completion
  is spliced token-exactly (`pyvf.splice`: the sampled ids before the marker are kept),
  and ONE forward with gradient over [prompt | reasoning | reference answer] gives both
  the reward pi(answer | prompt, reasoning) and the loss (`pyvf.losses.verifree_loss`
  on the packed spliced batch, log-probs from `pyvf.ops.token_logprobs`).
- `RLPRTrainer`: TRL's `GRPOTrainer` with RLPR's reward (docs/algorithms.md). A trainer and
  not a reward function, because the reward needs the policy's own probabilities of the
  reference (a TRL reward function gets text and ids, not the model) and a score of
  every training prompt by the *initial* policy before the first step.
- `patch_per_token_logps(trainer_or_model)`: TRL's fused LM head (the
  `model(..., labels=..., fused_lm_head=True)` path of GRPO, RLOO, SFT, DPO, KTO) computed
  by `token_logprobs` from the hidden states; the `[tokens, vocab]` logits are never
  built.

TRL is imported only when a trainer class is first used.
"""

from __future__ import annotations

import functools
import math
import types
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from pyvf.losses import verifree_loss
from pyvf.ops import segment_sum, token_logprobs
from pyvf.packing import IGNORE_INDEX, ROLE_ANSWER, Sequence, pack
from pyvf.rewards import RewardStdFilter, rlpr_rewards
from pyvf.splice import DEFAULT_ANSWER_TEMPLATE, DEFAULT_MARKER, splice_reference

TESTED_TRL_VERSION = "1.16.0"
_INSTALL_HINT = f"pip install 'pyvf[trl]' (or pip install trl=={TESTED_TRL_VERSION})"

# The two trainers are built on first access (module __getattr__), when TRL is imported.
__all__ = ["VeriFreeTrainer", "RLPRTrainer", "patch_per_token_logps", "FusedLogprobsOutput",  # noqa: F822
           "TESTED_TRL_VERSION"]


# --- patch_per_token_logps -------------------------------------------------------------

_NOT_COMPUTED = ("log_sum_sq_probs", "mean_logits", "is_top1")


@dataclass
class FusedLogprobsOutput(ModelOutput):
    """What TRL's fused LM head returns (`trl.trainer.utils.FusedCausalLMOutput`), less
    the fields `token_logprobs` does not compute. Per-token fields are 0 where the label
    is -100."""
    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None

    def __getattr__(self, name):
        if name in _NOT_COMPUTED:
            # A clear error where the caller reads it, rather than a None deep in its metrics code.
            raise NotImplementedError(
                f"'{name}' is not computed by pyvf's LM head (patch_per_token_logps gives log_probs and entropy "
                f"only); this trainer needs TRL's own fused head: do not patch it")
        raise AttributeError(name)


def _is_trainer(obj) -> bool:
    return not isinstance(obj, nn.Module) and isinstance(getattr(obj, "model", None), nn.Module) \
        and hasattr(obj, "args")


def _unwrap_peft(model: nn.Module) -> nn.Module:
    # PEFT routes the forward to the wrapped model's forward, so that is the one to patch.
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _logit_scale(text_config) -> float:
    """The factor some architectures multiply the logits by (same config keys TRL reads)."""
    for key in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(text_config, key, None)
        if value is not None:
            return float(value)
    scaling = getattr(text_config, "logits_scaling", None)
    if scaling is not None:
        return float(scaling) if text_config.model_type == "hyperclovax" else 1.0 / float(scaling)
    return 1.0


def _install_head(model: nn.Module, temperature: float, with_entropy: bool, cast_lm_head_to_fp32: bool,
                  backend: str) -> None:
    text_config = model.config.get_text_config()
    if getattr(text_config, "final_logit_softcapping", None):
        raise ValueError(f"{type(model).__name__} soft-caps its logits (final_logit_softcapping), which "
                         f"token_logprobs does not apply; keep TRL's own head for this model")
    scale = _logit_scale(text_config)
    if not scale > 0:
        raise ValueError(f"{type(model).__name__} scales its logits by {scale}; token_logprobs needs a positive "
                         f"scale (it folds it into the temperature)")
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head) weight to take log-probs from")
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}'s lm_head has a bias, which token_logprobs does not take")
    # logits * scale / temperature == logits / (temperature / scale)
    effective_temperature = float(temperature) / scale
    previous_forward = model.forward  # the class forward, or TRL's fused one: it serves plain calls

    @functools.wraps(type(model).forward)  # `generate` validates its kwargs against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if not fused_lm_head:
            for key, value in (("labels", labels), ("shift_labels", shift_labels),
                               ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[key] = value
            return previous_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        outputs = self.base_model(*args, **kwargs)
        hidden = outputs.last_hidden_state
        if shift_labels is None:
            if labels is None:
                raise ValueError("fused_lm_head=True needs labels (or shift_labels): the tokens to score")
            hidden, targets = hidden[:, :-1], labels[:, 1:]
        else:
            targets = shift_labels
        head_now = self.get_output_embeddings()  # FSDP and PEFT may have replaced it since patching
        weight = head_now.weight
        if type(weight).__name__ == "DTensor":  # FSDP2 shards; the kernel needs the whole head
            weight = weight.full_tensor()
        hidden = hidden.to(weight.device)
        targets = targets.to(weight.device)
        device_type = hidden.device.type
        if cast_lm_head_to_fp32:
            hidden, weight = hidden.float(), weight.float()
        elif torch.is_autocast_enabled(device_type):
            # What F.linear would do under autocast: both operands in the autocast dtype.
            dtype = torch.get_autocast_dtype(device_type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        elif hidden.dtype != weight.dtype:
            hidden = hidden.to(weight.dtype)
        flat_h = hidden.reshape(-1, hidden.shape[-1])
        flat_t = targets.reshape(-1)
        out = token_logprobs(flat_h, weight, flat_t, temperature=effective_temperature, ignore_index=IGNORE_INDEX,
                             with_entropy=with_entropy, backend=backend)
        logp, entropy = out if with_entropy else (out, None)
        logp = logp.view(targets.shape)
        entropy = entropy.view(targets.shape) if entropy is not None else None
        mask = targets != IGNORE_INDEX
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -logp.sum() / denom
        aux_loss = None
        if kwargs.get("output_router_logits"):
            from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

            aux_loss = load_balancing_loss_func(outputs.router_logits, text_config.num_experts,
                                                text_config.num_experts_per_tok, kwargs.get("attention_mask"))
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedLogprobsOutput(loss=loss, log_probs=logp, entropy=entropy, label_mask=mask, aux_loss=aux_loss)

    model.forward = types.MethodType(forward, model)
    model._pyvf_token_logprobs = True


def _check_not_zero3() -> None:
    # ZeRO-3 re-partitions the head after the forward, and token_logprobs' backward reads it again.
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return
    if is_deepspeed_zero3_enabled():
        raise ValueError("patch_per_token_logps does not support DeepSpeed ZeRO-3 (the lm_head is partitioned "
                         "between forward and backward); use ZeRO-2 or FSDP, or keep TRL's own head")


def patch_per_token_logps(trainer_or_model, *, temperature: float | None = None, backend: str = "auto",
                          cast_lm_head_to_fp32: bool | None = None):
    """Makes TRL's fused LM head use `pyvf.ops.token_logprobs`.

    trainer_or_model: a TRL trainer (GRPO, RLOO, SFT, DPO, KTO, ...: its policy and, if
    any, its reference model are patched, at the trainer's temperature) or a transformers
    causal LM (then `model(input_ids, labels=..., fused_lm_head=True)` works on it,
    patched before or after TRL's `add_fused_lm_head`). Calls without `fused_lm_head`
    (generation, plain forwards) are unchanged. The call returns per-token `log_probs`
    and `entropy` (0 where the label is -100) and the mean NLL as `loss`, from the
    hidden states and the lm_head weight; the `[tokens, vocab]` logits are never built.
    Patch before `trainer.train()`. Returns `trainer_or_model`.
    """
    if isinstance(trainer_or_model, nn.Module):
        targets = [(_unwrap_peft(trainer_or_model), True)]
        temp = 1.0 if temperature is None else temperature
        fp32 = bool(cast_lm_head_to_fp32)
    elif _is_trainer(trainer_or_model):
        trainer = trainer_or_model
        targets = [(_unwrap_peft(trainer.model), True)]
        ref = getattr(trainer, "ref_model", None)
        if isinstance(ref, nn.Module):
            targets.append((_unwrap_peft(ref), False))
        temp = getattr(trainer, "temperature", 1.0) if temperature is None else temperature
        fp32 = bool(getattr(trainer.args, "cast_lm_head_to_fp32", False)) if cast_lm_head_to_fp32 is None \
            else cast_lm_head_to_fp32
    else:
        raise ValueError(f"trainer_or_model must be a TRL trainer or a transformers model, got "
                         f"{type(trainer_or_model).__name__}")
    if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not math.isfinite(temp) or temp <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temp!r}")
    _check_not_zero3()
    for model, with_entropy in targets:
        if not hasattr(model, "base_model") or not hasattr(model, "get_output_embeddings"):
            raise ValueError(f"trainer_or_model: {type(model).__name__} is not a transformers causal LM")
        _install_head(model, float(temp), with_entropy, fp32, backend)
    return trainer_or_model


# --- shared pieces of the two trainers ---------------------------------------------------

def _references(example: dict, column: str) -> list[str]:
    if column not in example:
        raise ValueError(f"the dataset needs an '{column}' column (a reference answer or a list of them); "
                         f"got columns {sorted(example)}")
    value = example[column]
    refs = [value] if isinstance(value, str) else list(value)
    if not refs or not all(isinstance(r, str) and r.strip() for r in refs):
        raise ValueError(f"'{column}' must be a non-empty string or a non-empty list of them, got {value!r}")
    return refs


def _closing_text(answer_template: str) -> str:
    """The last word of the rendered answer ('</answer>'): a completion cut by the length
    limit still counts when its answer was closed before the cut."""
    tail = answer_template.format(ref="\x00").split("\x00")[-1].split()
    return tail[-1] if tail else ""


def _left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _right_pad(rows: list[list[int]], pad: int, device, width: int | None = None):
    width = max((len(r) for r in rows), default=0) if width is None else width
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


def _row(ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
    return ids[mask.bool()].tolist()


def _score_forward(model, sequences: list[Sequence], pad_id: int, device, layout_model: nn.Module):
    """Per-token log-probs (packed order) of packed sequences through the model's fused
    head: one decoder forward, `token_logprobs` on the rows that have a target. The
    layout is pyvf's (`pyvf.runtime.model.choose_forward_mode`, decided once per model):
    padding-free [1, T] with position_ids restarting per sequence where the attention
    takes it, else padded [B, L]. `model` may be wrapped (DDP, PEFT); `layout_model` is
    the transformers model underneath."""
    from pyvf.runtime.model import choose_forward_mode

    batch = pack(sequences)
    if choose_forward_mode(layout_model, device) == "packed":
        out = model(input_ids=batch.input_ids.to(device)[None], position_ids=batch.position_ids.to(device)[None],
                    shift_labels=batch.targets.to(device)[None], fused_lm_head=True)
        return out.log_probs[0], batch
    padded = batch.padded(pad_id=pad_id)
    out = model(input_ids=padded.input_ids.to(device), attention_mask=padded.attention_mask.to(device),
                position_ids=padded.position_ids.to(device), shift_labels=padded.targets.to(device),
                fused_lm_head=True)
    logp = out.log_probs.reshape(-1).index_select(0, padded.flat_positions().to(out.log_probs.device))
    return logp, batch


def _check_dataset_columns(dataset, column: str, name: str) -> None:
    names = getattr(dataset, "column_names", None)
    if isinstance(names, list) and column not in names:
        raise ValueError(f"{name} needs a '{column}' column with the reference answer(s); it has {names}")


def _trl():
    try:
        import trl  # noqa: F401
        from trl import GRPOTrainer  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"pyvf.integrations.trl needs TRL: {_INSTALL_HINT}") from exc
    import trl

    return trl


@functools.lru_cache(maxsize=None)
def _trainer_classes():
    trl = _trl()
    from accelerate.utils import gather, gather_object
    from trl import GRPOTrainer
    from trl.trainer.utils import split_tensor_dict

    def _validate_common(cls_name, args, kwargs):
        for key in ("tools", "environment_factory"):
            if kwargs.get(key):
                raise ValueError(f"{cls_name} does not support `{key}`: the reward needs a single completion "
                                 f"that ends in an answer")
        if args is None:
            return
        if args.beta != 0.0:
            raise ValueError(f"{cls_name} has no KL term to a reference model (docs/algorithms.md); set beta=0.0, "
                             f"got {args.beta}")

    class VeriFreeTrainer(GRPOTrainer):
        """GRPOTrainer with the single-pass VeriFree objective (see the module docstring).

        Extra keyword arguments: `marker` ("<answer"), `answer_template`
        ("> \\\\boxed{{{ref}}} </answer>"), `answer_column` ("answer"), `backend` (of
        `token_logprobs`). GRPO's own loss settings (loss_type, epsilon, scale_rewards,
        importance sampling, entropy bonus) do not apply: VeriFree's loss is
        -(A_i * log pi(reasoning_i) + R_i * log pi(answer_i)), mean over completions, with
        RLOO advantages A_i and rewards R_i = pi(answer_i | prompt, reasoning_i).
        """

        _tag_names = ["trl", "grpo", "pyvf", "verifree"]

        def __init__(self, model, args=None, train_dataset=None, eval_dataset=None, processing_class=None, *,
                     reward_funcs=None, marker: str = DEFAULT_MARKER,
                     answer_template: str = DEFAULT_ANSWER_TEMPLATE, answer_column: str = "answer",
                     backend: str = "auto", **kwargs):
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
                spliced = splice_reference(self._tokenizer, c_ids, refs, marker=self.marker,
                                           answer_template=self.answer_template)
                ok = spliced[0].found
                if ok and (not c_ids or c_ids[-1] not in eos_and_pad):
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
                                completion=completion.to(dev), weights=weights.to(dev))
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

    VeriFreeTrainer.__module__ = RLPRTrainer.__module__ = __name__
    del trl
    return {"VeriFreeTrainer": VeriFreeTrainer, "RLPRTrainer": RLPRTrainer}


def __getattr__(name):
    if name in ("VeriFreeTrainer", "RLPRTrainer"):
        cls = _trainer_classes()[name]
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
