"""verifree_loss forward+backward on packed batches (segment sums, grouped advantages,
the per-token weights), the step that turns log-probs into the loss.

    pytest benchmarks/test_bench_verifree_loss.py
"""

import pytest
import torch
from conftest import run_timed

from pyvf.bench import random_packed_batch
from pyvf.losses import verifree_loss


@pytest.mark.parametrize("n_seq,seq_len", [(64, 256), (256, 512), (1024, 1024)])
def test_verifree_loss(benchmark, device, sync, n_seq, seq_len):
    if device.type == "cpu" and n_seq * seq_len > 2**18:
        pytest.skip("large batches run on a GPU only")
    batch = random_packed_batch(n_seq, seq_len, 1000, 8, device)
    logprobs = (-torch.rand(batch.input_ids.numel(), device=device)).requires_grad_()

    def call():
        logprobs.grad = None
        verifree_loss(logprobs, batch.roles, batch.cu_seqlens, batch.groups).loss.backward()

    benchmark.group = f"verifree_loss-{n_seq}x{seq_len}"
    benchmark.extra_info.update(op="verifree_loss", impl="pyvf", n=n_seq * seq_len, **{"pass": "fwdbwd"})
    run_timed(benchmark, sync, call)
