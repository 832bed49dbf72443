"""The default rollout engine: `HFGenerate`, a batched sampling loop over a Hugging Face
model, and `greedy` decoding for evaluation. Returns, for every prompt, n completions that
end at a stop string (its tokens included), at an EOS id or at the length limit, with the
sampling log-prob of every token."""

from __future__ import annotations

import inspect

import torch

from pyvf.chat import stop_token_ids as stop_token_ids_of
from pyvf.runtime.rollout.base import Completion, validate_generate_args
from pyvf.runtime.rollout.seeding import as_int64, row_key, sample_tokens


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
        key_t = torch.tensor([as_int64(k) for k in keys], dtype=torch.int64, device=device) if keys is not None else None
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
    on_policy = True  # samples from the trained module itself

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
                decode_batch(self.model, [[self.pad_id]], 1, max_new_tokens=max_new_tokens, temperature=1.0,
                             keys=None, stop_token_ids=self.stop_token_ids,
                             stop_checker=StopChecker(self.tokenizer, []),
                             pad_id=self.pad_id, synced=True, idle=True)
            return []
        keys = [row_key(int(seed), j) for seed in seeds for j in range(n)] if temperature > 0 else None
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
