"""Loading the policy and turning a packed batch into per-token log-probs without the
model's full logits."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pyvf.ops import token_logprobs
from pyvf.packing import PackedBatch

BUILTIN_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "model"


def resolve_model_path(spec: str) -> Path:
    path = BUILTIN_MODEL_DIR if spec == "builtin" else Path(spec)
    if not (path / "config.json").is_file():
        if spec == "builtin":
            raise ValueError(f"the built-in model is missing from {path}; rebuild it with "
                             f"python -m pyvf.assets.build_model")
        raise ValueError(f"model path {path} is not a Hugging Face model directory (no config.json)")
    return path


def load_model_and_tokenizer(spec: str, dtype: torch.dtype = torch.float32):
    """A causal LM and its tokenizer from a local directory: safetensors weights, no
    remote code, nothing downloaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(spec)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True,
                                                 trust_remote_code=False, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_weights(model: nn.Module, tensors: dict) -> None:
    """Full weights (a checkpoint's model.safetensors) into an unsharded model; a tied
    lm_head may be absent from the file."""
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
        raise ValueError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()


class PolicyLogprobs(nn.Module):
    """Wraps a causal LM so that one forward returns per-token log-probs of the packed
    batch's targets: the decoder gives hidden states, `token_logprobs` applies the
    lm_head only on the rows that have a target. Being a module (rather than a
    function reaching into `model.lm_head`) lets FSDP2 gather the lm_head for it."""

    def __init__(self, model: nn.Module, backend: str = "auto"):
        super().__init__()
        self.model = model
        self.backend = backend

    def forward(self, batch: PackedBatch, temperature: float = 1.0) -> torch.Tensor:
        padded = batch.padded(pad_id=0)
        device = self.model.get_output_embeddings().weight.device
        decoder = self.model.get_decoder()
        out = decoder(input_ids=padded.input_ids.to(device), attention_mask=padded.attention_mask.to(device),
                      position_ids=padded.position_ids.to(device), use_cache=False)
        hidden = out.last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, padded.flat_positions().to(device))
        weight = self.model.get_output_embeddings().weight
        return token_logprobs(flat, weight, batch.targets.to(device), temperature=temperature,
                              ignore_index=batch.ignore_index, backend=self.backend)
