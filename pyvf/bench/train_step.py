"""One full VeriFree training step of a Qwen3-shaped model initialized at random: pyvf's
path (hidden states -> token_logprobs) against the same step through full logits."""

from __future__ import annotations

import torch

from pyvf.bench import Record, default_dtype, dtype_name, peak_memory_bytes, random_packed_batch, time_ms

QWEN3_SHAPES = {
    # name: (hidden, layers, heads, kv heads, intermediate); vocabulary 151936, head_dim 128
    "qwen3-0.6b": (1024, 28, 16, 8, 3072),
    "qwen3-1.7b": (2048, 28, 16, 8, 6144),
    "tiny": (64, 2, 2, 1, 128),
}
# Not exposed as IMPLS: `pyvf bench --impls` filters the lm_head suites only, as it always has.
STEP_IMPLS = ("pyvf", "full-logits")


def _qwen3(shape: str, vocab: int, dtype: torch.dtype, device: torch.device):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hidden, layers, heads, kv, inter = QWEN3_SHAPES[shape]
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, head_dim=max(16, hidden // heads),
                      max_position_embeddings=65536, tie_word_embeddings=shape != "qwen3-1.7b")
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg).to(dtype)
    model.config.use_cache = False
    model.gradient_checkpointing_enable()
    return model


def train_step_fn(model, batch, impl: str):
    """One VeriFree step: forward, log-probs, loss, backward, AdamW. `pyvf`: hidden
    states -> token_logprobs; `full-logits`: the model's logits -> fp32 log-softmax."""
    from pyvf.losses import verifree_loss
    from pyvf.train.model import PolicyLogprobs

    policy = PolicyLogprobs(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=False)
    padded = batch.padded()

    def logprobs():
        if impl == "pyvf":
            return policy(batch)
        logits = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask,
                       position_ids=padded.position_ids).logits
        flat = logits.reshape(-1, logits.shape[-1]).index_select(0, padded.flat_positions().to(logits.device))
        logp = torch.log_softmax(flat.float(), dim=-1)
        safe = batch.targets.clamp(min=0)
        return torch.where(batch.targets >= 0, logp.gather(1, safe[:, None]).squeeze(1), 0.0)

    def step():
        out = verifree_loss(logprobs(), batch.roles, batch.cu_seqlens, batch.groups)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_train_step(shape: str, n_seq: int, seq_len: int, device: torch.device, dtype: torch.dtype,
                     vocab: int = 151936, impls=None) -> list[Record]:
    """Tokens/s and peak memory of one training step, pyvf's fused path against the
    same step through the model's full logits (`ms` per step)."""
    model = _qwen3(shape, vocab, dtype, device)
    batch = random_packed_batch(n_seq, seq_len, vocab, 8, device)
    records = []
    for impl in impls or STEP_IMPLS:
        rec = Record("train_step", impl, "fwdbwd", n_seq * seq_len, model.config.hidden_size, vocab,
                     dtype_name(dtype), None, None, None)
        try:
            step = train_step_fn(model, batch, impl)
            rec.ms = time_ms(step, device, repeats=3, warmup=1)
            rec.peak_mem_bytes = peak_memory_bytes(step, device)
            rec.tokens_per_s = n_seq * seq_len / (rec.ms / 1e3)
        except torch.OutOfMemoryError:
            rec.status = "out of memory"
        records.append(rec)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records


def longest_trainable(shape: str, impl: str, device: torch.device, dtype: torch.dtype, n_seq: int = 8,
                      start: int = 1024, limit: int = 262144) -> int:
    """The longest sequence (doubling from `start`) whose training step fits in memory."""
    model = _qwen3(shape, 151936, dtype, device)
    best, length = 0, start
    while length <= limit:
        try:
            batch = random_packed_batch(n_seq, length, 151936, 8, device)
            train_step_fn(model, batch, impl)()
            best = length
            length *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return best


def default_cases(device: torch.device) -> list[tuple[str, int, int]]:
    if device.type == "cuda":
        return [("qwen3-0.6b", 8, 2048), ("qwen3-1.7b", 8, 2048)]
    return [("tiny", 8, 128)]


def run(device: torch.device, sizes: list[int] | None, impls: list[str] | None) -> list[Record]:
    records = []
    vocab = 151936 if device.type == "cuda" else 32000
    for shape, n_seq, seq_len in default_cases(device):
        print(f"bench: training step {shape}, {n_seq} x {seq_len} tokens", flush=True)
        records += bench_train_step(shape, n_seq, seq_len, device, default_dtype(device), vocab=vocab, impls=impls)
    return records
