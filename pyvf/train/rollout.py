"""Sampling completions. The trainer talks to a `RolloutEngine`; `HFGenerate` (Hugging
Face `generate`) is the default, and a faster engine (vLLM, SGLang) plugs in by
implementing the same one method."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Completion:
    ids: list[int]        # sampled tokens, through EOS when one was sampled
    truncated: bool       # hit max_new_tokens without EOS
    logprobs: list[float] | None = None  # log-prob of each sampled token under the sampling policy


class RolloutEngine(Protocol):
    def sample(self, prompt_ids: list[int], n: int, *, max_new_tokens: int, temperature: float,
               seed: int) -> list[Completion]:
        """n independent completions of one prompt, reproducible from `seed`."""


def prompt_seed(seed: int, step: int, prompt_index: int) -> int:
    """A seed per (run, step, prompt), so a prompt's samples do not depend on which
    rank draws them or on what was sampled before (distributed runs and resumed runs
    sample exactly what an uninterrupted single-process run samples)."""
    digest = hashlib.sha256(f"{seed}:{step}:{prompt_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class HFGenerate:
    """Ancestral sampling with `model.generate` (top-k and top-p off)."""

    def __init__(self, model, tokenizer, *, synced: bool = False):
        self.model = model
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.synced = synced  # keep ranks stepping together while the model is sharded

    @torch.no_grad()
    def sample(self, prompt_ids, n, *, max_new_tokens, temperature, seed):
        device = self.model.get_output_embeddings().weight.device
        inputs = torch.tensor([prompt_ids] * n, dtype=torch.long, device=device)
        torch.manual_seed(seed)
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(
                inputs, attention_mask=torch.ones_like(inputs), do_sample=True, temperature=temperature,
                top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, eos_token_id=self.eos_id,
                pad_token_id=self.pad_id, synced_gpus=self.synced, output_scores=True,
                return_dict_in_generate=True,
            )
        finally:
            self.model.train(was_training)
        tokens = out.sequences[:, len(prompt_ids):]
        # The scores are the processed (temperature-scaled) logits each token was drawn
        # from: their log-softmax at the drawn token is the rollout log-prob.
        logprobs = torch.stack([torch.log_softmax(scores.float(), dim=-1).gather(1, tokens[:, t:t + 1]).squeeze(1)
                                for t, scores in enumerate(out.scores)], dim=1).tolist()
        completions = []
        for row, lp in zip(tokens.tolist(), logprobs):
            if self.eos_id in row:
                end = row.index(self.eos_id) + 1
                completions.append(Completion(row[:end], truncated=False, logprobs=lp[:end]))
            else:
                completions.append(Completion(row, truncated=True, logprobs=lp))
        return completions


def greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 32) -> list[list[int]]:
    """Greedy completions (without the EOS), left-padded in batches."""
    device = model.get_output_embeddings().weight.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(prompts), batch_size):
                chunk = prompts[i:i + batch_size]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for r, p in enumerate(chunk):
                    ids[r, width - len(p):] = torch.tensor(p)
                    mask[r, width - len(p):] = 1
                out = model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                     max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=pad)
                for row in out[:, width:].tolist():
                    if tokenizer.eos_token_id in row:
                        row = row[:row.index(tokenizer.eos_token_id)]
                    results.append(row)
    finally:
        model.train(was_training)
    return results
