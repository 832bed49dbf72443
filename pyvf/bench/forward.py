"""The policy forward + backward on a length-skewed batch (one long sequence among many
short ones): padded to the longest sequence (`PackedBatch.padded()`) against
padding-free packed, and against the longest sequence alone, the floor a padding-free
layout approaches. On the CPU the shipped model; on a GPU a Qwen3-0.6B-shaped model
initialized at random (bf16; flash-attn varlen when installed)."""

from __future__ import annotations

import torch

from pyvf.bench import Record, default_dtype, dtype_name, peak_memory_bytes, time_ms
from pyvf.bench.train_step import _qwen3
from pyvf.packing import Sequence, pack
from pyvf.runtime.model import choose_forward_mode, load_model_and_tokenizer, set_forward_mode
from pyvf.runtime.policy import Policy

IMPLS = ("padded", "packed", "longest-alone")
# (long sequences, long length, short sequences, short length): 1 x 500 + 63 x 8 tokens
DEFAULT_SKEW = (1, 500, 63, 8)


def skewed_batch(vocab: int, n_long: int, long_len: int, n_short: int, short_len: int, seed: int = 0):
    """Packed batch of n_long sequences of long_len and n_short of short_len tokens (first
    a fifth prompt, the rest reasoning), groups of 8."""

    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i, n in enumerate([long_len] * n_long + [short_len] * n_short):
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        p = max(1, n // 5)
        seqs.append(Sequence(ids[:p], ids[p:], [], group=i // 8))
    return seqs, pack(seqs)


def _model(device: torch.device, dtype: torch.dtype):
    if device.type == "cuda":
        model = _qwen3("qwen3-0.6b", 151936, dtype, device)
        model.gradient_checkpointing_disable()
        return model

    return load_model_and_tokenizer("builtin", dtype)[0].to(device)


def forward_backward_fn(model, batch, mode: str):
    policy = Policy(model)
    device = model.get_output_embeddings().weight.device
    batch = batch.to(device)

    def step():
        set_forward_mode(model, mode)
        policy(batch).sum().backward()
        model.zero_grad(set_to_none=True)

    return step


ABOUT = ("forward: padded vs packed forward+backward of a length-skewed batch (1 x 500 + 63 x 8 tokens) "
         "against its longest sequence alone; no FLOP count. peak MiB on CUDA only")


def run(device: torch.device, sizes: list[int] | None = None, impls: list[str] | None = None,
        skew: tuple[int, int, int, int] = DEFAULT_SKEW) -> list[Record]:
    """`sizes`, when given, replaces the long sequence's length."""

    dtype = default_dtype(device)
    model = _model(device, dtype)
    model.train()
    vocab = model.get_input_embeddings().weight.shape[0]
    packed_ok = choose_forward_mode(model) == "packed"
    records = []
    for long_len in sizes or [skew[1]]:
        seqs, batch = skewed_batch(vocab, skew[0], long_len, skew[2], skew[3])
        alone = pack(seqs[:1])
        print(f"bench: forward+backward, {skew[0]} x {long_len} + {skew[2]} x {skew[3]} tokens", flush=True)
        for impl in impls or IMPLS:
            b = alone if impl == "longest-alone" else batch
            rec = Record("forward", impl, "fwdbwd", b.input_ids.numel(), model.config.hidden_size, vocab,
                         dtype_name(dtype), None, None, None)
            if impl != "padded" and not packed_ok:
                rec.status = "model cannot take packed input"
                records.append(rec)
                continue
            step = forward_backward_fn(model, b, "padded" if impl == "padded" else "packed")
            try:
                rec.ms = time_ms(step, device, repeats=5, warmup=1)
                rec.peak_mem_bytes = peak_memory_bytes(step, device)
                rec.tokens_per_s = b.input_ids.numel() / (rec.ms / 1e3)
            except torch.OutOfMemoryError:
                rec.status = "out of memory"
            records.append(rec)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        base = {r.impl: r.ms for r in records[-len(impls or IMPLS):] if r.ms}
        if "longest-alone" in base:
            print("bench: vs the longest sequence alone: "
                  + ", ".join(f"{k} {v / base['longest-alone']:.2f}x" for k, v in base.items()), flush=True)
    return records
