"""Loading the policy and turning a packed batch into per-token log-probs without the
model's full logits.

The decoder runs on the packed batch itself, padding-free: one row [1, T] whose
position_ids restart at 0 in each sequence. With no attention mask and no cache,
transformers reads the sequence boundaries from those position_ids: flash-attn takes the
varlen path (cu_seqlens), PyTorch attention (sdpa, eager, flex) a block-diagonal causal
mask. Where flash-attn is installed and the model runs on a GPU in half precision, the
model is switched to it. A model that cannot take packed input (its attention ignores
position_ids) is detected by a small probe at the first forward and gets the padded
layout instead (`PackedBatch.padded()`); the choice is logged once per model.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from pyvf.packing import PackedBatch, Sequence, pack
from pyvf.runtime import checkpoint

log = logging.getLogger("pyvf")

BUILTIN_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "model"


def resolve_model_path(spec: str) -> Path:
    """"builtin", a Hugging Face model directory, or a pyvf run directory (its latest
    checkpoint)."""
    path = BUILTIN_MODEL_DIR if spec == "builtin" else Path(spec)
    latest = path / "checkpoints" / "latest"
    if not (path / "config.json").is_file() and latest.is_file():
        path = path / "checkpoints" / latest.read_text().strip()
    if not (path / "config.json").is_file():
        if spec == "builtin":
            raise ValueError(f"the built-in model is missing from {path}; rebuild it with "
                             f"python -m pyvf.assets.build_model")
        raise ValueError(f"model path {path} is not a Hugging Face model directory (no config.json)")
    return path


def load_model_and_tokenizer(spec: str, dtype: torch.dtype = torch.float32):
    """A causal LM and its tokenizer from a local directory: safetensors weights, no
    remote code, nothing downloaded."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(spec)
    if checkpoint.is_sharded(path):
        model = _from_sharded_checkpoint(path, dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=False, local_files_only=True)
    return model, load_tokenizer(path)


def load_tokenizer(spec: str | Path):
    """The tokenizer of a model directory, run or builtin (a pad token set: the EOS when
    it has none); no remote code, nothing downloaded."""
    from transformers import AutoTokenizer

    path = resolve_model_path(str(spec))
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _from_sharded_checkpoint(path: Path, dtype: torch.dtype):
    """A pyvf checkpoint's model: built from its config.json, its weights read from the
    DCP shards by this process alone (no process group needed)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    load_weights(model, checkpoint.load_model_tensors(path))
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
    return model.to(dtype).eval()


def enable_activation_checkpointing(model) -> None:
    """Recomputes each decoder layer in the backward instead of keeping its activations.
    Set before FSDP2 wraps the layers (as torchtitan orders them), in the non-reentrant
    form, the one that composes with FSDP2 (transformers checkpoints the layer's forward,
    so FSDP2's hooks stay outside it)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_weights(model: nn.Module, tensors: dict) -> None:
    """Full weights (checkpoint.load_model_tensors) into an unsharded model; a tied
    lm_head may be absent from the file."""
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
        raise ValueError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()


FORWARD_MODES = ("packed", "padded")
_MODE_ATTR = "_pyvf_forward_mode"
_FORCED_ATTR = "_pyvf_forward_mode_forced"  # set_forward_mode: no per-batch choice


def _flash_attention_implementation() -> str | None:
    """The flash-attn implementation transformers can use here, best first."""
    if importlib.util.find_spec("flash_attn_interface") is not None:  # FA3 (Hopper)
        return "flash_attention_3"
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return None


def _attn_implementation(model) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def _hidden_packed(model, batch: PackedBatch) -> torch.Tensor:
    device = model.get_output_embeddings().weight.device
    out = model.get_decoder()(input_ids=batch.input_ids.to(device)[None], position_ids=batch.position_ids.to(device)[None],
                              use_cache=False)
    return out.last_hidden_state[0]


def _hidden_padded(model, batch: PackedBatch) -> torch.Tensor:
    padded = batch.padded(pad_id=0)
    device = model.get_output_embeddings().weight.device
    out = model.get_decoder()(input_ids=padded.input_ids.to(device), attention_mask=padded.attention_mask.to(device),
                              position_ids=padded.position_ids.to(device), use_cache=False)
    hidden = out.last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, padded.flat_positions().to(device))


@torch.no_grad()
def _packed_matches(model) -> bool:
    """Whether the packed forward of two short sequences gives what each gives alone."""

    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 3)]
    batch = pack([Sequence(s, [], [], group=i) for i, s in enumerate(seqs)])
    was_training = model.training
    model.eval()  # no dropout in the comparison
    try:
        packed = _hidden_packed(model, batch).float()
        alone = torch.cat([_hidden_packed(model, pack([Sequence(s, [], [], group=0)])).float() for s in seqs])
    finally:
        model.train(was_training)
    tol = 1e-3 if packed.dtype == torch.float32 and next(model.parameters()).dtype == torch.float32 else 5e-2
    return bool(torch.isfinite(packed).all()) and float((packed - alone).norm() / alone.norm().clamp_min(1e-12)) < tol


def choose_forward_mode(model, device: torch.device | None = None) -> str:
    """Decides once per model how `decoder_hidden_states` runs it ("packed" or "padded"),
    switching to flash-attn where it is installed and the model is in half precision on a
    GPU, and logs the choice. Returns the mode."""
    mode = getattr(model, _MODE_ATTR, None)
    if mode is not None:
        return mode
    weight = model.get_output_embeddings().weight
    device = device or weight.device
    before = _attn_implementation(model)
    flash = _flash_attention_implementation()
    if (device.type == "cuda" and flash and weight.dtype in (torch.bfloat16, torch.float16)
            and not before.startswith("flash_attention") and hasattr(model, "set_attn_implementation")):
        try:
            model.set_attn_implementation(flash)
        except (ImportError, ValueError) as e:
            log.warning("policy forward: %s unavailable (%s), keeping %s", flash, e, before)
    impl = _attn_implementation(model)
    mode = "packed" if _packed_matches(model) else None
    if mode is None and impl != before:  # flash-attn did not take packed input: back to what it was
        model.set_attn_implementation(before)
        impl = before
        mode = "packed" if _packed_matches(model) else None
    mode = mode or "padded"
    setattr(model, _MODE_ATTR, mode)
    if mode == "packed":
        how = "varlen" if impl.startswith("flash_attention") else "block-diagonal causal mask from position_ids"
        log.info("policy forward: packed, padding-free (%s attention, %s)", impl, how)
    else:
        log.info("policy forward: padded (%s attention does not take packed input)", impl)
    return mode


def set_forward_mode(model, mode: str) -> None:
    """Forces `decoder_hidden_states`' layout for this model (benchmarks, tests)."""
    if mode not in FORWARD_MODES:
        raise ValueError(f"mode must be one of {', '.join(FORWARD_MODES)}, got {mode!r}")
    setattr(model, _MODE_ATTR, mode)
    setattr(model, _FORCED_ATTR, True)


def _packed_is_cheaper(model, batch: PackedBatch) -> bool:
    """Without a varlen kernel the packed forward attends through a dense [T, T] block-
    diagonal mask: T^2 score pairs, against B * L^2 when padded to the longest sequence
    (B * L tokens through the layers' matmuls, against T). A FLOP estimate picks the
    cheaper layout per batch: packed for a length-skewed batch, padded for equal lengths."""
    if _attn_implementation(model).startswith("flash_attention"):
        return True
    lengths = batch.cu_seqlens.diff()
    t, b, longest = batch.input_ids.numel(), lengths.numel(), int(lengths.max())
    layers = getattr(model.get_decoder(), "layers", None)
    per_token = 2 * sum(p.numel() for p in layers[0].parameters()) if layers else 24 * model.config.hidden_size ** 2
    heads = getattr(model.config, "num_attention_heads", 1)
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // heads
    per_pair = 4 * heads * head_dim
    return t * per_token + t * t * per_pair <= b * longest * per_token + b * longest * longest * per_pair


def decoder_hidden_states(model, batch: PackedBatch) -> torch.Tensor:
    """The decoder's last hidden states of a packed batch, [T, H] in packed order: the
    rows `token_logprobs` pairs with batch.targets."""
    if choose_forward_mode(model) == "packed" and (getattr(model, _FORCED_ATTR, False)
                                                   or _packed_is_cheaper(model, batch)):
        return _hidden_packed(model, batch)
    return _hidden_padded(model, batch)


def save_model(model, tokenizer, output_dir: str | Path) -> Path:
    """A Hugging Face model directory (safetensors weights, config, tokenizer), written
    next to `output_dir` and renamed into place."""
    out = Path(output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
