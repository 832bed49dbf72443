"""`patch_per_token_logps`: TRL's fused LM head (`fused_lm_head=True`) computed by
`pyvf.ops.token_logprobs` from the hidden states, and `FusedLogprobsOutput`, what it
returns. Needs transformers, not TRL: a model can be patched before TRL is imported.
"""

from __future__ import annotations

import functools
import math
import types
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from pyvf.ops import token_logprobs
from pyvf.packing import IGNORE_INDEX

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
