"""One full VeriFree training step: pyvf's trainer step itself (`Trainer.step`: splice,
packed decoder forward, the answer rows looked at first, the fused lm_head pass
`policy_loss`, backward, AdamW), the same with `lm_head_pass: autograd` (token_logprobs
+ autograd), and a step through the model's full logits. The trainer's rollout is a
`ReplayEngine` (no sampling), so the step times training alone. Qwen3 shapes initialized
at random (with the shipped tokenizer, whose ids they all cover), or the shipped model
("builtin")."""

from __future__ import annotations

import tempfile
import time
from typing import Callable

import torch

from pyvf.assets import load_tokenizer
from pyvf.bench import Record, default_dtype, dtype_name, peak_memory_bytes, random_packed_batch, time_ms
from pyvf.runtime.model import enable_activation_checkpointing, load_model_and_tokenizer
from pyvf.runtime.rollout import Completion
from pyvf.train.config import from_dict
from pyvf.train.trainer import Trainer

QWEN3_SHAPES = {
    # name: (hidden, layers, heads, kv heads, intermediate); vocabulary 151936, head_dim 128
    "qwen3-0.6b": (1024, 28, 16, 8, 3072),
    "qwen3-1.7b": (2048, 28, 16, 8, 6144),
    "tiny": (64, 2, 2, 1, 128),
}
# Not exposed as IMPLS: `pyvf bench --impls` filters the lm_head suites only, as it always has.
STEP_IMPLS = ("pyvf", "pyvf-autograd", "full-logits")


def _qwen3(shape: str, vocab: int, dtype: torch.dtype, device: torch.device):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if shape == "builtin":
        return load_model_and_tokenizer("builtin", dtype)[0].to(device)

    hidden, layers, heads, kv, inter = QWEN3_SHAPES[shape]
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, head_dim=max(16, hidden // heads),
                      max_position_embeddings=65536, tie_word_embeddings=shape != "qwen3-1.7b")
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg).to(dtype)
    model.config.use_cache = False
    enable_activation_checkpointing(model)
    return model


class ReplayEngine:
    """A rollout engine that samples nothing: every prompt gets n copies of one completion
    of `length` tokens that ends in an answer, so a step times the trainer's work."""

    name = "replay"

    def __init__(self, tokenizer, length: int):
        tail = tokenizer(" <answer> \\boxed{1} </answer>", add_special_tokens=False)["input_ids"]
        body = tokenizer(" 3 + 10 = 13. 13 - 9 = 4.", add_special_tokens=False)["input_ids"]
        n = max(length - len(tail), 1)
        self.ids = (body * (n // len(body) + 1))[:n] + tail

    def generate(self, prompts, n, **_):
        return [[Completion(list(self.ids), "stop", [-1.0] * len(self.ids)) for _ in range(n)] for _ in prompts]

    def update_weights(self, named_tensors) -> None:
        pass

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass


def trainer_for(model, n_seq: int, seq_len: int, lm_head_pass: str, device: torch.device) -> Trainer:
    """A VeriFree `Trainer` on `model` whose every step trains n_seq completions (at least
    one group of 2) that fill about seq_len tokens each (prompt included), in one
    micro-batch."""
    tokenizer = load_tokenizer()
    group = max(min(8, n_seq), 2)
    prompt_len = 48  # about the synthetic task's prompts
    cfg = from_dict(dict(objective="verifree", data="synthetic", n_synthetic=64, group_size=group,
                         prompts_per_step=max(n_seq // group, 1), max_new_tokens=max(seq_len - prompt_len, 8),
                         max_seq_len=seq_len + 4096, micro_batch_tokens=4 * n_seq * (seq_len + 64), lr=1e-6,
                         lm_head_pass=lm_head_pass, device=device.type, progress=False, plot=False,
                         rollout_logprob_warn=float("inf"),  # the replayed log-probs are made up
                         output_dir=tempfile.mkdtemp(prefix="pyvf-bench-")))
    engine = ReplayEngine(tokenizer, cfg.max_new_tokens)
    return Trainer.build(cfg, engine=engine, model=model, tokenizer=tokenizer)


# The three ways of the bench's step through the lm_head (pyvf.runtime.policy.LM_HEAD_PASSES).
LM_HEAD_PASS = {"pyvf": "fused", "pyvf-autograd": "autograd", "full-logits": "full_logits"}


def train_step_fn(model, batch, impl: str):
    """`Trainer.step` on about the tokens of `batch` (its number of sequences and mean
    length), with impl's lm_head pass: `pyvf` the fused `policy_loss`, `pyvf-autograd`
    token_logprobs + autograd, `full-logits` the [T, V] logits and their log-softmax."""
    n_seq = batch.num_sequences
    return trainer_for(model, n_seq, batch.input_ids.numel() // n_seq, LM_HEAD_PASS[impl], model.device).step


def bench_train_step(shape: str, n_seq: int, seq_len: int, device: torch.device, dtype: torch.dtype,
                     vocab: int = 151936, impls=None, model=None, repeats: int | None = None,
                     on_record: Callable[[Record], None] | None = None) -> list[Record]:
    """Tokens/s and peak memory of one `Trainer.step` with each lm_head pass (`ms` per
    step; `n` the tokens one step trains, prompts included). `model` reuses one made by
    `_qwen3`; `on_record` sees each Record as soon as it is measured."""
    model = model if model is not None else _qwen3(shape, vocab, dtype, device)
    vocab = model.config.vocab_size  # the shipped model has its own
    batch = random_packed_batch(n_seq, seq_len, vocab, 8, device)
    repeats = repeats or (3 if device.type == "cuda" else 5)
    records = []
    for impl in impls or STEP_IMPLS:
        rec = Record("train_step", impl, "fwdbwd", n_seq * seq_len, model.config.hidden_size, vocab,
                     dtype_name(dtype), None, None, None)
        try:
            step = train_step_fn(model, batch, impl)
            first = step()  # the warm-up, and how many tokens a step trains
            rec.n = round(first["tokens_per_s"] * first["step_time"])
            rec.ms = time_ms(step, device, repeats=repeats, warmup=0)
            rec.peak_mem_bytes = peak_memory_bytes(step, device)
            rec.tokens_per_s = rec.n / (rec.ms / 1e3)
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            rec.ms = None
            rec.status = "out of memory"
        records.append(rec)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if on_record is not None:
            on_record(rec)
    return records


def search_longest(model, impl: str, device: torch.device, n_seq: int = 1, start: int = 1024,
                   limit: int = 262144, time_budget_s: float | None = None) -> dict:
    """The longest sequence (doubling from `start`, at most `limit`) whose training step
    fits in memory, for `model` and `impl`. With `time_budget_s`, stops before a length
    whose step would not finish in the time left, predicting 4x the last step (attention
    is quadratic in the length).

    Returns {"longest", "stopped_by", "steps", "memory_extrapolated"}: stopped_by is
    "out of memory", "limit" or "time budget"; steps lists [tokens, seconds, peak bytes]
    per length tried that fitted; on a GPU, when the search stopped before running out of
    memory, memory_extrapolated is the length at which the peak memory of the last two
    steps, growing linearly, would reach the device's memory (an estimate, not a run)."""
    vocab = model.config.vocab_size
    start_time = time.perf_counter()
    best, length, steps, stopped_by = 0, start, [], "limit"
    while length <= limit:
        try:
            batch = random_packed_batch(n_seq, length, vocab, 8, device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            train_step_fn(model, batch, impl)()
            peak = None
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                peak = torch.cuda.max_memory_allocated(device)
            steps.append([length, round(time.perf_counter() - t0, 3), peak])
            best = length
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)  # what the failed step left behind
            stopped_by = "out of memory"
            break
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        length *= 2
        if time_budget_s is not None and length <= limit:
            left = time_budget_s - (time.perf_counter() - start_time)
            if 4 * steps[-1][1] > left:
                stopped_by = "time budget"
                break
    extrapolated = None
    if device.type == "cuda" and stopped_by != "out of memory" and len(steps) >= 2:
        (l0, _, m0), (l1, _, m1) = steps[-2], steps[-1]
        per_token = (m1 - m0) / (l1 - l0)
        if per_token > 0:
            total = torch.cuda.get_device_properties(device).total_memory
            extrapolated = int(l1 + (total - m1) / per_token)
    return {"longest": best, "stopped_by": stopped_by, "steps": steps, "memory_extrapolated": extrapolated}


def longest_trainable(shape: str, impl: str, device: torch.device, dtype: torch.dtype, n_seq: int = 8,
                      start: int = 1024, limit: int = 262144) -> int:
    """The longest sequence (doubling from `start`) whose training step fits in memory."""
    model = _qwen3(shape, 151936, dtype, device)
    return search_longest(model, impl, device, n_seq=n_seq, start=start, limit=limit)["longest"]


ABOUT = ("train_step: one Trainer.step (splice, packed forward, lm_head pass, backward, AdamW) on replayed "
         "completions, per lm_head pass (pyvf = policy_loss, pyvf-autograd, full-logits); n = tokens per step. "
         "CPU: a tiny Qwen3 shape (H=64, V=32000, 8 x 128 tokens) and the shipped model (64 x 40); GPU: "
         "Qwen3-0.6B and 1.7B shapes, V=151936, 8 x 2048. No FLOP count: tokens/s")


def default_cases(device: torch.device) -> list[tuple[str, int, int]]:
    if device.type == "cuda":
        return [("qwen3-0.6b", 8, 2048), ("qwen3-1.7b", 8, 2048)]
    return [("tiny", 8, 128), ("builtin", 64, 40)]


def run(device: torch.device, sizes: list[int] | None, impls: list[str] | None) -> list[Record]:
    records = []
    vocab = 151936 if device.type == "cuda" else 32000
    for shape, n_seq, seq_len in default_cases(device):
        print(f"bench: training step {shape}, {n_seq} x {seq_len} tokens", flush=True)
        records += bench_train_step(shape, n_seq, seq_len, device, default_dtype(device), vocab=vocab, impls=impls)
    return records
