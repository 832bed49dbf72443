"""verifree_loss (per-sequence sums, RLOO, loss) forward+backward on a packed batch."""

from __future__ import annotations

import torch

from pyvf.bench import Record, peak_memory_bytes, random_packed_batch, time_ms
from pyvf.losses import verifree_loss


def bench_verifree_loss(n_seq: int, seq_len: int, device: torch.device) -> list[Record]:
    batch = random_packed_batch(n_seq, seq_len, 1000, 8, device)
    logprobs = (-torch.rand(batch.input_ids.numel(), device=device)).requires_grad_()

    def call():
        logprobs.grad = None
        verifree_loss(logprobs, batch.roles, batch.cu_seqlens, batch.groups).loss.backward()

    return [Record("verifree_loss", "pyvf", "fwdbwd", batch.input_ids.numel(), 0, 0, "float32",
                   time_ms(call, device), None, peak_memory_bytes(call, device))]


ABOUT = ("verifree_loss: forward+backward on a packed batch of 256 sequences x 512 tokens (N = 131072 "
         "log-probs, groups of 8); no FLOP count (a few flops per token). peak MiB on CUDA only")


def run(device: torch.device, sizes: list[int] | None, impls: list[str] | None) -> list[Record]:
    print("bench: verifree_loss", flush=True)
    return bench_verifree_loss(256, 512, device)
