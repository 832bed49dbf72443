"""One full VeriFree training step: pyvf's trainer path (packed decoder forward, the
answer rows looked at first, then the fused lm_head pass `policy_loss`), the same with
`lm_head_pass: autograd` (token_logprobs + autograd), and the step through the model's
full logits. Qwen3 shapes initialized at random, or the shipped model ("builtin")."""

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
STEP_IMPLS = ("pyvf", "pyvf-autograd", "full-logits")


def _qwen3(shape: str, vocab: int, dtype: torch.dtype, device: torch.device):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if shape == "builtin":
        from pyvf.train.model import load_model_and_tokenizer

        return load_model_and_tokenizer("builtin", dtype)[0].to(device)

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
    """One VeriFree step: forward, log-probs, loss, backward, AdamW. `pyvf`: the
    trainer's path (hidden states, answer rows first, fused lm_head pass);
    `pyvf-autograd`: the same with token_logprobs + autograd; `full-logits`: the model's
    logits -> fp32 log-softmax -> verifree_loss."""
    from pyvf.losses import verifree_loss
    from pyvf.objectives.verifree import verifree_coefficients
    from pyvf.packing import ROLE_ANSWER
    from pyvf.train.policy import Policy

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=False)
    padded = batch.padded()
    n_seq = batch.num_sequences

    def loss():
        if impl.startswith("pyvf"):
            policy = Policy(model, lm_head_pass="autograd" if impl == "pyvf-autograd" else "fused")
            coeffs = lambda looked: (verifree_coefficients(looked, batch.roles, batch.cu_seqlens,  # noqa: E731
                                                           batch.groups).coeffs / n_seq, None)
            return policy(batch, coefficients=coeffs, look=batch.roles == ROLE_ANSWER)[0]
        logits = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask,
                       position_ids=padded.position_ids).logits
        flat = logits.reshape(-1, logits.shape[-1]).index_select(0, padded.flat_positions().to(logits.device))
        logp = torch.log_softmax(flat.float(), dim=-1)
        safe = batch.targets.clamp(min=0)
        logp = torch.where(batch.targets >= 0, logp.gather(1, safe[:, None]).squeeze(1), 0.0)
        return verifree_loss(logp, batch.roles, batch.cu_seqlens, batch.groups).loss

    def step():
        loss().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_train_step(shape: str, n_seq: int, seq_len: int, device: torch.device, dtype: torch.dtype,
                     vocab: int = 151936, impls=None) -> list[Record]:
    """Tokens/s and peak memory of one training step, pyvf's fused path against the
    same step through the model's full logits (`ms` per step)."""
    model = _qwen3(shape, vocab, dtype, device)
    vocab = model.config.vocab_size  # the shipped model has its own
    batch = random_packed_batch(n_seq, seq_len, vocab, 8, device)
    records = []
    for impl in impls or STEP_IMPLS:
        rec = Record("train_step", impl, "fwdbwd", n_seq * seq_len, model.config.hidden_size, vocab,
                     dtype_name(dtype), None, None, None)
        try:
            step = train_step_fn(model, batch, impl)
            rec.ms = time_ms(step, device, repeats=3 if device.type == "cuda" else 5, warmup=1)
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
    return [("tiny", 8, 128), ("builtin", 64, 40)]


def run(device: torch.device, sizes: list[int] | None, impls: list[str] | None) -> list[Record]:
    records = []
    vocab = 151936 if device.type == "cuda" else 32000
    for shape, n_seq, seq_len in default_cases(device):
        print(f"bench: training step {shape}, {n_seq} x {seq_len} tokens", flush=True)
        records += bench_train_step(shape, n_seq, seq_len, device, default_dtype(device), vocab=vocab, impls=impls)
    return records
