"""Sampling completions. The trainer talks to a `RolloutEngine`: `HFGenerate` (a batched
sampling loop over a Hugging Face model, the default) or `VLLMEngine`
(pyvf/train/rollout_vllm.py). Both return, for every prompt, n completions that end at a
stop string (its tokens included), at an EOS id or at the length limit, with the sampling
log-prob of every token."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from pyvf.chat import stop_token_ids as stop_token_ids_of


@dataclass
class Completion:
    ids: list[int]         # sampled tokens, through the stop string's last token or the EOS when one ended it
    finish: str            # "stop" (a stop string), "eos" (an EOS id), "length" (max_new_tokens)
    logprobs: list[float]  # sampling log-prob of each token in ids (processed: after temperature)

    @property
    def truncated(self) -> bool:
        return self.finish == "length"


class RolloutEngine(Protocol):
    name: str  # "hf" or "vllm"

    def generate(self, prompts: list[list[int]], n: int, *, max_new_tokens: int, temperature: float,
                 seeds: list[int], stop: list[str], min_new_tokens: int = 0) -> list[list[Completion]]:
        """n completions per prompt; what prompt i samples depends only on (prompts[i],
        seeds[i]) and the weights, never on the batch, its order or the rank. EOS is not
        sampled before `min_new_tokens` tokens."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Full (unsharded) weights after an optimizer step, names as in model.state_dict()."""

    def sleep(self) -> None:
        """Frees the engine's memory (KV cache) while the trainer runs."""

    def wake(self) -> None:
        """Undoes `sleep` before the next rollout."""


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


def validate_generate_args(prompts, n, max_new_tokens, temperature, seeds, stop, min_new_tokens=0) -> None:
    if not isinstance(prompts, (list, tuple)) or any(not isinstance(p, (list, tuple)) or not p for p in prompts):
        raise ValueError("prompts must be a list of non-empty lists of token ids")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if len(seeds) != len(prompts):
        raise ValueError(f"seeds must have one seed per prompt: {len(seeds)} seeds for {len(prompts)} prompts")
    if isinstance(stop, str) or not isinstance(stop, (list, tuple)) or any(not isinstance(s, str) or not s for s in stop):
        raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
    if (isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int)
            or not 0 <= min_new_tokens <= max_new_tokens):
        raise ValueError(f"min_new_tokens must be an int in [0, max_new_tokens], got {min_new_tokens!r}")


# Counter-based randomness: the Gumbel noise of row r at decoding step t and vocabulary
# entry v is a hash of (row key, t, v), so a row's samples depend on its key alone,
# whatever else is in the batch, on any device, and the whole batch draws in one op.
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _signed(c: int) -> int:
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
    z = x + _signed(_GOLDEN)
    z = (z ^ _shr(z, 30)) * _signed(_MIX1)
    z = (z ^ _shr(z, 27)) * _signed(_MIX2)
    return z ^ _shr(z, 31)


def row_key(seed: int, sample_index: int) -> int:
    """The random stream of sample `sample_index` of a prompt seeded with `seed`."""
    return splitmix64((splitmix64(seed & _MASK64) ^ splitmix64(sample_index + 1)) & _MASK64)


def gumbel_noise(keys: torch.Tensor, step: int, vocab_size: int) -> torch.Tensor:
    """Standard Gumbel noise [rows, vocab_size] (float32), a function of (key, step, v)."""
    base = splitmix64_tensor(keys + _signed(step * _GOLDEN))
    vocab = torch.arange(vocab_size, device=keys.device, dtype=torch.int64) * _signed(_MIX2)
    bits = splitmix64_tensor(base[:, None] + vocab[None, :])
    u = (_shr(bits, 40).float() + 0.5) * 2.0 ** -24  # 24 random bits, strictly inside (0, 1)
    return -torch.log(-torch.log(u))


def sample_tokens(scores: torch.Tensor, keys: torch.Tensor, step: int) -> torch.Tensor:
    """One token per row of `scores` ([rows, V] processed logits) by the Gumbel-max trick:
    argmax(scores + Gumbel noise) is a draw from softmax(scores)."""
    return (scores + gumbel_noise(keys, step, scores.shape[-1])).argmax(-1)


class StopChecker:
    """Finds the first token whose decoded text completes a stop string: decodes only the
    last few tokens of a row (enough to hold the longest stop string), as the text before
    them was already checked."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        if self.stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        # A token decodes to at least one character (a byte-fallback piece to at least a
        # replacement character), so a stop string ending at the last token lies within
        # its last len(stop) tokens; the margin covers pieces that decode to nothing.
        self.window = 2 * max((len(s) for s in self.stop), default=0) + 4

    def __call__(self, ids: list[int]) -> bool:
        if not self.stop:
            return False
        text = self.tokenizer.decode(ids[-self.window:], skip_special_tokens=True)
        return any(s in text for s in self.stop)


def _cache_kwarg(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _all_done(done: bool, synced: bool, device) -> bool:
    """With a sharded model every rank must run the same number of forwards."""
    if not synced:
        return done
    import torch.distributed as dist

    flag = torch.tensor([0.0 if done else 1.0], device=device)
    dist.all_reduce(flag)
    return flag.item() == 0


@torch.no_grad()
def decode_batch(model, prompts: list[list[int]], n: int, *, max_new_tokens: int, temperature: float,
                 keys: list[int] | None, stop_token_ids: list[int], stop_checker: StopChecker,
                 pad_id: int = 0, synced: bool = False, min_new_tokens: int = 0, idle: bool = False
                 ) -> list[tuple[list[int], str, list[float]]]:
    """The decoding loop shared by sampling and greedy decoding: the prompts left-padded
    into one batch and prefilled once, their KV cache repeated n times, then one token per
    step for every unfinished row (finished rows leave the batch). Row i * n + j is sample
    j of prompt i; it draws with Gumbel noise from keys[i * n + j] (greedy when keys is
    None). EOS ids are masked out for the first `min_new_tokens` steps. `idle`: a synced
    rank with nothing to decode steps along with placeholder rows until every rank is
    done. Returns (ids, finish, logprobs) per row."""
    from transformers import DynamicCache

    device = model.get_output_embeddings().weight.device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    cache_arg = _cache_kwarg(model)
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       logits_to_keep=1, **{cache_arg: cache}).logits[:, -1]
        if n > 1:
            cache.batch_repeat_interleave(n)
            logits = logits.repeat_interleave(n, dim=0)
            mask = mask.repeat_interleave(n, dim=0)
            positions = positions.repeat_interleave(n, dim=0)
        rows = len(prompts) * n
        next_pos = positions[:, -1:] + 1
        key_t = torch.tensor([_signed(k) for k in keys], dtype=torch.int64, device=device) if keys is not None else None
        stop_ids = torch.tensor(stop_token_ids, dtype=torch.long, device=device)
        out_ids: list[list[int]] = [[] for _ in range(rows)]
        out_lp: list[list[float]] = [[] for _ in range(rows)]
        finish = ["length"] * rows
        # The output row of each batch row; an idle rank's one row is a placeholder from the start.
        active = [-1] * rows if idle else list(range(rows))
        for step in range(max_new_tokens):
            scores = logits.float() / temperature if keys is not None else logits.float()
            # Log-probs of the model's own distribution (the trainer's), also where EOS is masked.
            logprobs = torch.log_softmax(scores, dim=-1)
            if step < min_new_tokens:
                scores = scores.index_fill(1, stop_ids, float("-inf"))
            if keys is not None:
                tokens = sample_tokens(scores, key_t, step)
            else:
                tokens = scores.argmax(-1)
            token_lp = logprobs.gather(1, tokens[:, None]).squeeze(1)
            is_eos = torch.isin(tokens, stop_ids)
            keep = []
            for b, (row, tok, lp, eos) in enumerate(zip(active, tokens.tolist(), token_lp.tolist(), is_eos.tolist())):
                if row < 0:  # a placeholder row that keeps a synced rank stepping
                    continue
                out_ids[row].append(tok)
                out_lp[row].append(lp)
                if eos:
                    finish[row] = "eos"
                elif stop_checker(out_ids[row]):
                    finish[row] = "stop"
                else:
                    keep.append(b)
            last = step == max_new_tokens - 1
            if _all_done(not keep or last, synced, device) or last:
                break
            if not keep:  # this rank is done, others are not: step one placeholder row
                keep = [0]
                active[0] = -1
            if len(keep) < len(active):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                mask, next_pos, tokens = mask[index], next_pos[index], tokens[index]
                key_t = key_t[index] if key_t is not None else None
                active = [active[b] for b in keep]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True,
                           **{cache_arg: cache}).logits[:, -1]
            next_pos = next_pos + 1
    finally:
        model.train(was_training)
    return list(zip(out_ids, finish, out_lp))


class HFGenerate:
    """Ancestral sampling (no top-k, no top-p) over a Hugging Face causal LM: every prompt
    x n of a call in one batched decoding loop with a KV cache. Each sample draws from its
    own counter-based random stream (seed of its prompt, sample index), so what a prompt
    samples does not depend on the rest of the batch or the rank."""

    name = "hf"

    def __init__(self, model, tokenizer, *, stop_token_ids: list[int] | None = None, synced: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.stop_token_ids = list(stop_token_ids) if stop_token_ids is not None else stop_token_ids_of(model, tokenizer)
        if not self.stop_token_ids:
            raise ValueError("stop_token_ids must hold at least one EOS id")
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else self.stop_token_ids[0]
        self.synced = synced  # keep ranks stepping together while the model is sharded

    def generate(self, prompts, n, *, max_new_tokens, temperature, seeds, stop=(), min_new_tokens=0):
        validate_generate_args(prompts, n, max_new_tokens, temperature, seeds, stop, min_new_tokens)
        stop = list(stop)
        if not prompts:
            if self.synced:  # the other ranks may decode: step along until they are done
                decode_batch(self.model, [[self.pad_id]], 1, max_new_tokens=max_new_tokens, temperature=temperature,
                             keys=[0], stop_token_ids=self.stop_token_ids, stop_checker=StopChecker(self.tokenizer, []),
                             pad_id=self.pad_id, synced=True, idle=True)
            return []
        keys = [row_key(int(seed), j) for seed in seeds for j in range(n)]
        rows = decode_batch(self.model, [list(p) for p in prompts], n, max_new_tokens=max_new_tokens,
                            temperature=temperature, keys=keys, stop_token_ids=self.stop_token_ids,
                            stop_checker=StopChecker(self.tokenizer, stop), pad_id=self.pad_id, synced=self.synced,
                            min_new_tokens=min_new_tokens)
        completions = [Completion(ids, finish, lp) for ids, finish, lp in rows]
        return [completions[i * n:(i + 1) * n] for i in range(len(prompts))]

    def update_weights(self, named_tensors) -> None:
        """No-op: the engine samples from the trained module itself."""

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass


def greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 32, *,
           stop: list[str] = (), stop_token_ids: list[int] | None = None) -> list[list[int]]:
    """Greedy completions in batches: without the EOS, through the end of a stop string
    when one ended them."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(stop, str):
        raise ValueError(f"stop must be a list of strings, got {stop!r}")
    stop_ids = list(stop_token_ids) if stop_token_ids is not None else stop_token_ids_of(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    checker = StopChecker(tokenizer, list(stop))
    results = []
    for i in range(0, len(prompts), batch_size):
        rows = decode_batch(model, prompts[i:i + batch_size], 1, max_new_tokens=max_new_tokens, temperature=1.0,
                            keys=None, stop_token_ids=stop_ids, stop_checker=checker, pad_id=pad)
        results += [ids[:-1] if finish == "eos" else ids for ids, finish, _ in rows]
    return results
