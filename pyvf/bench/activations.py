"""One long micro-batch through the policy, forward+backward (the packed decoder forward
and the fused lm_head pass, as the trainer runs it), with and without activation
checkpointing: its peak memory is what decides the longest completion that fits. `none`
keeps every decoder layer's activations for the backward; `full` keeps one layer's at a
time and recomputes them (about 1.33x the decoder FLOPs).

On the CPU the peak memory is measured in a fresh process per setting
(pyvf/bench/memory.py); on a GPU by the allocator's peak.
"""

from __future__ import annotations

import torch

from pyvf.bench import Record, default_dtype, dtype_name, measure
from pyvf.bench.memory import fill_cpu_memory
from pyvf.packing import Sequence, pack
from pyvf.runtime.model import enable_activation_checkpointing
from pyvf.runtime.policy import Policy

IMPLS = ("none", "full")
# (hidden, layers, heads, vocabulary, tokens): a deep, narrow model, so the activations and
# not the weights dominate, and one sequence of the given length.
CPU_CASES = [(256, 12, 4, 32000, 1024), (256, 12, 4, 32000, 4096)]
GPU_CASES = [(2048, 28, 16, 151936, 16384), (2048, 28, 16, 151936, 32768)]
ABOUT = ("activations: forward+backward of one long sequence through a Qwen3-shaped policy (packed forward, fused "
         "lm_head pass), activation checkpointing none or full. CPU: fp32, hidden 256, 12 layers, V=32000, 1k and "
         "4k tokens; GPU: bf16, the 1.7B shape, 16k and 32k tokens. No TFLOP/s. peak MiB: extra memory of one "
         "call (CPU: resident, fresh process per setting)")


def _policy(hidden: int, layers: int, heads: int, vocab: int, dtype: torch.dtype, device: torch.device,
            checkpointing: str) -> Policy:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=max(heads // 2, 1), intermediate_size=3 * hidden, head_dim=hidden // heads,
                      max_position_embeddings=65536)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg).to(dtype)
    model.config.use_cache = False
    if checkpointing == "full":
        enable_activation_checkpointing(model)
    model.train()
    return Policy(model)


def _case(checkpointing: str, hidden: int, layers: int, heads: int, vocab: int, tokens: int, dtype: torch.dtype,
          device: torch.device):
    policy = _policy(hidden, layers, heads, vocab, dtype, device, checkpointing)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (tokens,), generator=g).tolist()
    batch = pack([Sequence(ids[:64], ids[64:], [], group=0)])
    coeffs = torch.randn(tokens, generator=g).to(device)

    def call():
        policy.zero_grad(set_to_none=True)
        loss, _, _ = policy(batch, 1.0, coefficients=lambda looked: (coeffs, None))
        loss.backward()

    return call, policy


def memory_call(impl: str, hidden: int, layers: int, heads: int, vocab: int, tokens: int, dtype: str, device: str):
    """The case pyvf/bench/memory.py measures in its fresh process."""
    call, policy = _case(impl, hidden, layers, heads, vocab, tokens, getattr(torch, dtype), torch.device(device))
    return call, list(policy.parameters())


def run(device: torch.device, sizes: list[int] | None, impls: list[str] | None) -> list[Record]:
    dtype = default_dtype(device)
    records = []
    for hidden, layers, heads, vocab, tokens in (GPU_CASES if device.type == "cuda" else CPU_CASES):
        if sizes is not None and tokens > max(sizes):
            continue
        print(f"bench: activations, {tokens} tokens, {layers} layers of {hidden}", flush=True)
        for impl in impls or IMPLS:
            rec = Record("activations", impl, "fwdbwd", tokens, hidden, vocab, dtype_name(dtype), None, None, None)
            call, _ = _case(impl, hidden, layers, heads, vocab, tokens, dtype, device)
            records.append(measure(rec, call, device, repeats=3, warmup=1))
    if device.type == "cpu":
        layers_of = {(c[0], c[4]): c for c in CPU_CASES}
        fill_cpu_memory(records, __name__, lambda r: [*layers_of[(r.h, r.n)][:4], r.n, r.dtype, "cpu"])
    return records
