"""One full VeriFree training step (forward, log-probs, loss, backward, AdamW) of a
Qwen3-shaped model initialized at random: pyvf's fused path (hidden states ->
token_logprobs) against the same step through the model's full logits.

    pytest benchmarks/test_bench_train_step.py

GPU: Qwen3-0.6B and 1.7B shapes, bf16, V = 151936 (target: >= 1.3x the tokens/s of
the full-logits path at 1.7B). CPU: a tiny shape in fp32.
"""

import pytest
import torch
from conftest import run_timed

from pyvf.bench import _qwen3, peak_memory_bytes, random_packed_batch, train_step_fn

GPU_CASES = [("qwen3-0.6b", 8, 2048), ("qwen3-1.7b", 8, 2048)]
CPU_CASES = [("tiny", 8, 128)]


@pytest.fixture(params=range(2), ids=["first", "second"])
def case(request, device):
    cases = GPU_CASES if device.type == "cuda" else CPU_CASES
    if request.param >= len(cases):
        pytest.skip("shape runs on a GPU only")
    return cases[request.param]


@pytest.mark.parametrize("impl", ["pyvf", "full-logits"])
def test_train_step(benchmark, device, sync, case, impl):
    shape, n_seq, seq_len = case
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vocab = 151936 if device.type == "cuda" else 32000
    model = _qwen3(shape, vocab, dtype, device)
    batch = random_packed_batch(n_seq, seq_len, vocab, 8, device)
    step = train_step_fn(model, batch, impl)
    benchmark.group = f"train_step-{shape}-{n_seq}x{seq_len}"
    try:
        run_timed(benchmark, sync, step)
    except torch.OutOfMemoryError:
        pytest.skip(f"{impl} ran out of memory at {n_seq} x {seq_len}")
    tokens = n_seq * seq_len
    benchmark.extra_info.update(op="train_step", impl=impl, n=tokens, shape=shape,
                                tokens_per_s=tokens / benchmark.stats.stats.median,
                                peak_mem_bytes=peak_memory_bytes(step, device), **{"pass": "fwdbwd"})
