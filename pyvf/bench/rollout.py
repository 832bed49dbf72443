"""Sampled tokens per second of the rollout engines on one step's prompts x G samples:
Hugging Face `generate` called once per prompt (the engine pyvf had before batched
rollouts), the batched HF sampling loop (`HFGenerate`), and vLLM when it is importable
(its own environment on a CPU: .ci/vllm.sh). Stop at EOS only, so every engine samples
the same kind of work. On the CPU the shipped model; on a GPU a Qwen3-0.6B-shaped model
initialized at random (bf16)."""

from __future__ import annotations

import tempfile
import time

import torch

from pyvf.assets import load_tokenizer
from pyvf.bench import Record, default_dtype, dtype_name
from pyvf.bench.train_step import _qwen3
from pyvf.chat import stop_token_ids
from pyvf.data.synthetic import PROMPT_TEMPLATE
from pyvf.runtime.model import BUILTIN_MODEL_DIR, load_model_and_tokenizer
from pyvf.runtime.rollout import HFGenerate

IMPLS = ("hf-per-prompt", "hf-batched", "vllm")


class PerPromptGenerate:
    """`model.generate` once per prompt with n copies of it and a global seed: the HF
    engine as it was before the batched loop (kept here as the baseline)."""

    def __init__(self, model, stop_token_ids: list[int], pad_id: int):
        self.model, self.stop_token_ids, self.pad_id = model, stop_token_ids, pad_id

    @torch.no_grad()
    def generate(self, prompts, n, *, max_new_tokens, temperature, seeds, stop=()):
        device = self.model.get_output_embeddings().weight.device
        results = []
        self.model.eval()
        for prompt, seed in zip(prompts, seeds):
            inputs = torch.tensor([prompt] * n, dtype=torch.long, device=device)
            torch.manual_seed(seed)
            out = self.model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=True,
                                      temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                                      eos_token_id=self.stop_token_ids, pad_token_id=self.pad_id, output_scores=True,
                                      return_dict_in_generate=True)
            tokens = out.sequences[:, len(prompt):]
            logprobs = torch.stack([torch.log_softmax(s.float(), -1).gather(1, tokens[:, t:t + 1]).squeeze(1)
                                    for t, s in enumerate(out.scores)], dim=1).tolist()
            rows = []
            for row, lp in zip(tokens.tolist(), logprobs):
                end = next((i + 1 for i, t in enumerate(row) if t in self.stop_token_ids), len(row))
                rows.append((row[:end], lp[:end]))
            results.append(rows)
        return results


def _shipped(device, dtype):
    model, tok = load_model_and_tokenizer("builtin", dtype)
    return model.to(device), tok, str(BUILTIN_MODEL_DIR)


def _qwen3_0_6b(device, dtype, workdir: str):
    from pyvf.runtime.rollout.vllm import export_model_dir

    model = _qwen3("qwen3-0.6b", 151936, dtype, device)
    model.gradient_checkpointing_disable()
    model.config.use_cache = True
    tok = load_tokenizer()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok, str(export_model_dir(model, tok, f"{workdir}/qwen3-0.6b"))


def prompt_batch(tok, n_prompts: int) -> list[list[int]]:
    return [tok(PROMPT_TEMPLATE.format(question=f"What is {3 + 7 * i} + {11 * i % 17}?"),
                add_special_tokens=False)["input_ids"] for i in range(n_prompts)]


def _count(out) -> int:
    total = 0
    for group in out:
        for c in group:
            total += len(c[0]) if isinstance(c, tuple) else len(c.ids)
    return total


ABOUT = ("rollout: sampled tokens/s of per-prompt HF generate, batched HF and vLLM (when importable), 16 "
         "prompts x 8 samples x 64 tokens of the shipped model on the CPU; no FLOP count")


def run(device: torch.device, sizes: list[int] | None = None, impls: list[str] | None = None, *,
        group_size: int = 8, max_new_tokens: int | None = None, repeats: int = 2) -> list[Record]:
    """`sizes`: prompts per step (default 16). Each engine samples the same prompts with
    the same seeds `repeats` times after one warm-up call; the record's `n` is the number
    of tokens sampled per call and `tokens_per_s` the rate."""
    from pyvf.runtime.rollout.vllm import VLLMEngine, vllm_available

    dtype = default_dtype(device)
    max_new_tokens = max_new_tokens or (256 if device.type == "cuda" else 64)
    records = []
    with tempfile.TemporaryDirectory(prefix="pyvf-bench-rollout-") as workdir:
        if device.type == "cuda":
            model, tok, model_dir = _qwen3_0_6b(device, dtype, workdir)
        else:
            model, tok, model_dir = _shipped(device, dtype)
        stop_ids = stop_token_ids(model, tok)
        vocab = model.get_input_embeddings().weight.shape[0]
        engines = {}
        for n_prompts in sizes or [16]:
            prompts = prompt_batch(tok, n_prompts)
            seeds = list(range(1000, 1000 + n_prompts))
            print(f"bench: rollout, {n_prompts} prompts x {group_size} samples, {max_new_tokens} new tokens",
                  flush=True)
            for impl in impls or IMPLS:
                rec = Record("rollout", impl, "sample", 0, model.config.hidden_size, vocab, dtype_name(dtype),
                             None, None, None)
                records.append(rec)
                if impl == "vllm" and not vllm_available():
                    rec.status = "vllm not installed"
                    continue
                if impl not in engines:
                    if impl == "hf-per-prompt":
                        engines[impl] = PerPromptGenerate(model, stop_ids, tok.pad_token_id or stop_ids[0])
                    elif impl == "hf-batched":
                        engines[impl] = HFGenerate(model, tok, stop_token_ids=stop_ids)
                    else:
                        engines[impl] = VLLMEngine.from_model(model_dir, stop_token_ids=stop_ids, dtype=dtype,
                                                              cache_dir=f"{workdir}/vllm-cache",
                                                              gpu_memory_utilization=0.5)
                engine = engines[impl]

                def call(engine=engine, prompts=prompts, seeds=seeds):
                    return engine.generate(prompts, group_size, max_new_tokens=max_new_tokens, temperature=1.0,
                                           seeds=seeds, stop=[])

                try:
                    call()  # warm-up
                    times, tokens = [], 0
                    for _ in range(repeats):
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        start = time.perf_counter()
                        out = call()
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        times.append(time.perf_counter() - start)
                        tokens = _count(out)
                    rec.n = tokens
                    rec.ms = sorted(times)[len(times) // 2] * 1e3
                    rec.tokens_per_s = tokens / (rec.ms / 1e3)
                except torch.OutOfMemoryError:
                    rec.status = "out of memory"
                print(f"bench:   {impl}: {rec.tokens_per_s or 0:.0f} tokens/s ({rec.n} tokens, {rec.ms or 0:.0f} ms)",
                      flush=True)
    return records
