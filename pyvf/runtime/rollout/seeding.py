"""Seeds and counter-based randomness: what a prompt samples depends only on (run seed,
step, group) and the weights, never on the rank, the batch or what was sampled before, so
distributed and resumed runs sample exactly what an uninterrupted single-process run does."""

from __future__ import annotations

import hashlib

import torch


def prompt_seed(seed: int, step: int, prompt_index: int) -> int:
    """A seed per (run, step, prompt), so a prompt's samples do not depend on which
    rank draws them or on what was sampled before (distributed runs and resumed runs
    sample exactly what an uninterrupted single-process run samples)."""
    digest = hashlib.sha256(f"{seed}:{step}:{prompt_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def continuation_seed(seed: int, step: int, group: int, sample: int) -> int:
    """A seed per (run, step, group, sample) for sampling on after a completion (PCL's
    self-evaluation), independent of the rank and the batch as `prompt_seed`."""
    digest = hashlib.sha256(f"{seed}:{step}:{group}:{sample}:continue".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# Counter-based randomness: the Gumbel noise of row r at decoding step t and vocabulary
# entry v is a hash of (row key, t, v), so a row's samples depend on its key alone,
# whatever else is in the batch, on any device, and the whole batch draws in one op.
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def as_int64(c: int) -> int:
    """The int64 with the bit pattern of c mod 2**64 (torch has no uint64 arithmetic)."""
    c &= _MASK64
    return c - (1 << 64) if c >= 1 << 63 else c


def splitmix64(x: int) -> int:
    """SplitMix64's finalizer (Steele, Lea, Flood 2014) on a Python int."""
    z = (x + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64_tensor(x: torch.Tensor) -> torch.Tensor:
    """`splitmix64` elementwise on int64 tensors (two's complement wrap-around)."""
    z = x + as_int64(_GOLDEN)
    z = (z ^ _shr(z, 30)) * as_int64(_MIX1)
    z = (z ^ _shr(z, 27)) * as_int64(_MIX2)
    return z ^ _shr(z, 31)


def row_key(seed: int, sample_index: int) -> int:
    """The random stream of sample `sample_index` of a prompt seeded with `seed`."""
    return splitmix64((splitmix64(seed & _MASK64) ^ splitmix64(sample_index + 1)) & _MASK64)


def gumbel_noise(keys: torch.Tensor, step: int, vocab_size: int) -> torch.Tensor:
    """Standard Gumbel noise [rows, vocab_size] (float32), a function of (key, step, v)."""
    base = splitmix64_tensor(keys + as_int64(step * _GOLDEN))
    vocab = torch.arange(vocab_size, device=keys.device, dtype=torch.int64) * as_int64(_MIX2)
    bits = splitmix64_tensor(base[:, None] + vocab[None, :])
    # 24 random bits, inside (0, 1): k + 0.5 rounds to k + 1 in float32 for k >= 2^23, so
    # the largest k would give u = 1 and an infinite noise (that token always drawn);
    # the clamp keeps it at the largest float32 below 1.
    u = ((_shr(bits, 40).float() + 0.5) * 2.0 ** -24).clamp(max=1.0 - 2.0 ** -24)
    return -torch.log(-torch.log(u))


def sample_tokens(scores: torch.Tensor, keys: torch.Tensor, step: int) -> torch.Tensor:
    """One token per row of `scores` ([rows, V] processed logits) by the Gumbel-max trick:
    argmax(scores + Gumbel noise) is a draw from softmax(scores)."""
    return (scores + gumbel_noise(keys, step, scores.shape[-1])).argmax(-1)
