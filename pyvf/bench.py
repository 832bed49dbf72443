"""Timing and memory measurement of pyvf's ops against their peers.

`pyvf bench` runs this at sizes that fit the current machine, prints a table and can
write JSON; the pytest-benchmark suites in benchmarks/ use the same implementations
(`LOGPROB_IMPLS`) so every number compares the same code.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from pyvf.ops import grouped_advantages, segment_sum, token_logprobs

# ---------------------------------------------------------------------------
# Implementations of per-token log-probs from hidden states: pyvf and its peers.
# Each factory returns fn(hidden, weight, targets) -> float32 log-probs [N], or
# raises ImportError when the peer is not installed.
# ---------------------------------------------------------------------------


def _pyvf():
    return lambda h, w, t: token_logprobs(h, w, t)


def _pyvf_entropy():
    def fn(h, w, t):
        logp, entropy = token_logprobs(h, w, t, with_entropy=True)
        return logp + entropy  # both outputs reach the loss: entropy costs show up in backward

    return fn


def _torch_eager():
    def fn(h, w, t):
        logits = h @ w.t()
        return torch.log_softmax(logits.float(), dim=-1).gather(1, t[:, None]).squeeze(1)

    return fn


def _torch_compile_chunked(chunk: int = 4096):
    @torch.compile(dynamic=False)
    def one_chunk(h, w, t):
        logits = (h @ w.t()).float()
        return torch.log_softmax(logits, dim=-1).gather(1, t[:, None]).squeeze(1)

    return lambda h, w, t: torch.cat([one_chunk(h[i:i + chunk], w, t[i:i + chunk])
                                      for i in range(0, h.shape[0], chunk)])


def _liger():
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return lambda h, w, t: -liger_fused_linear_cross_entropy(h, w, t, reduction="none").float()


def _cut_cross_entropy():
    from cut_cross_entropy import linear_cross_entropy

    # CCE's defaults, as its users run it (gradient filtering on).
    return lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none").float()


LOGPROB_IMPLS: dict[str, Callable[[], Callable]] = {
    "pyvf": _pyvf,
    "pyvf+entropy": _pyvf_entropy,
    "torch-eager": _torch_eager,
    "torch-compile-chunked": _torch_compile_chunked,
    "liger-flce": _liger,
    "cut-cross-entropy": _cut_cross_entropy,
}


def logprob_flops(n: int, h: int, v: int, pass_: str) -> float:
    """FLOPs credited to one call: 2NHV forward, 6NHV forward+backward."""
    return (2.0 if pass_ == "fwd" else 6.0) * n * h * v


# ---------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of fn() in milliseconds, waiting for the device each call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak device memory allocated by one call beyond what was live before it
    (CUDA only; None on the CPU, where the allocator keeps no such count)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


@dataclass
class Record:
    op: str
    impl: str
    pass_: str
    n: int
    h: int
    v: int
    dtype: str
    ms: float | None
    tflops: float | None
    peak_mem_bytes: int | None
    status: str = "ok"
    tokens_per_s: float | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        return d


def _logprob_call(fn, hidden, weight, targets, pass_):
    if pass_ == "fwd":
        def call():
            with torch.no_grad():
                return fn(hidden, weight, targets)
        return call

    def call():
        hidden.grad = weight.grad = None
        fn(hidden, weight, targets).sum().backward()

    return call


def bench_logprobs(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device, impls=None,
                   passes=("fwd", "fwdbwd"), repeats: int = 10) -> list[Record]:
    """One Record per (implementation, pass); peers that are missing or run out of
    memory are recorded with a status instead of being dropped."""
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = (torch.randn(n, h, generator=g) * 1.0).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * (1.0 / h**0.5)).to(device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    records = []
    for name in impls or LOGPROB_IMPLS:
        try:
            fn = LOGPROB_IMPLS[name]()
        except ImportError as e:
            for p in passes:
                records.append(Record("token_logprobs", name, p, n, h, v, str(dtype).replace("torch.", ""),
                                      None, None, None, f"skipped: not installed ({e.name or e})"))
            continue
        for p in passes:
            rec = Record("token_logprobs", name, p, n, h, v, str(dtype).replace("torch.", ""), None, None, None)
            call = _logprob_call(fn, hidden, weight, targets, p)
            try:
                rec.ms = time_ms(call, device, repeats=repeats)
                rec.tflops = logprob_flops(n, h, v, p) / (rec.ms * 1e-3) / 1e12
                rec.peak_mem_bytes = peak_memory_bytes(call, device)
            except torch.OutOfMemoryError:
                rec.status = "out of memory"
            except Exception as e:  # a peer failing must not hide the others' numbers
                rec.status = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            finally:
                hidden.grad = weight.grad = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            records.append(rec)
    return records


def composite_advantages(rewards: torch.Tensor, group_size: int, estimator: str = "grpo",
                         eps: float = 1e-6) -> torch.Tensor:
    """The idiomatic PyTorch composite (view, mean/sum, std) that grouped_advantages is
    measured against, for contiguous groups."""
    x = rewards.view(-1, group_size)
    if estimator == "rloo":
        return (x - (x.sum(1, keepdim=True) - x) / (group_size - 1)).view(-1)
    return ((x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + eps)).view(-1)


def bench_groups(n: int, device: torch.device, group_size: int = 8) -> list[Record]:
    """grouped_advantages and segment_sum against PyTorch composites, and a copy."""
    rewards = torch.rand(n, device=device)
    out = torch.empty_like(rewards)
    cu = torch.arange(0, n + 1, 512, device=device)
    if int(cu[-1]) != n:
        cu = torch.cat([cu, torch.tensor([n], device=device)])
    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=device), cu.diff())
    cases = [
        ("grouped_advantages", "pyvf", lambda: grouped_advantages(rewards, group_size, estimator="grpo")),
        ("grouped_advantages", "torch-composite", lambda: composite_advantages(rewards, group_size)),
        ("grouped_advantages", "copy", lambda: out.copy_(rewards)),
        ("segment_sum", "pyvf", lambda: segment_sum(rewards, cu)),
        ("segment_sum", "torch-index_add",
         lambda: torch.zeros(cu.numel() - 1, device=device).index_add_(0, seg, rewards)),
    ]
    return [Record(op, impl, "fwd", n, 0, 0, "float32", time_ms(fn, device, repeats=20), None,
                   peak_memory_bytes(fn, device)) for op, impl, fn in cases]


# ---------------------------------------------------------------------------
# verifree_loss and the full training step
# ---------------------------------------------------------------------------

QWEN3_SHAPES = {
    # name: (hidden, layers, heads, kv heads, intermediate); vocabulary 151936, head_dim 128
    "qwen3-0.6b": (1024, 28, 16, 8, 3072),
    "qwen3-1.7b": (2048, 28, 16, 8, 6144),
    "tiny": (64, 2, 2, 1, 128),
}


def random_packed_batch(n_seq: int, seq_len: int, vocab: int, group_size: int, device, seed: int = 0):
    """A packed batch of n_seq sequences of seq_len tokens: 20% prompt, 70% reasoning,
    10% answer, random tokens."""
    from pyvf.packing import Sequence, pack

    g = torch.Generator().manual_seed(seed)
    p, a = max(1, seq_len // 5), max(1, seq_len // 10)
    r = seq_len - p - a
    seqs = [Sequence(*(torch.randint(0, vocab, (k,), generator=g).tolist() for k in (p, r, a)), group=i // group_size)
            for i in range(n_seq)]
    return pack(seqs).to(device)


def bench_verifree_loss(n_seq: int, seq_len: int, device: torch.device) -> list[Record]:
    from pyvf.losses import verifree_loss

    batch = random_packed_batch(n_seq, seq_len, 1000, 8, device)
    logprobs = (-torch.rand(batch.input_ids.numel(), device=device)).requires_grad_()

    def call():
        logprobs.grad = None
        verifree_loss(logprobs, batch.roles, batch.cu_seqlens, batch.groups).loss.backward()

    return [Record("verifree_loss", "pyvf", "fwdbwd", batch.input_ids.numel(), 0, 0, "float32",
                   time_ms(call, device), None, peak_memory_bytes(call, device))]


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
                     vocab: int = 151936) -> list[Record]:
    """Tokens/s and peak memory of one training step, pyvf's fused path against the
    same step through the model's full logits (`ms` per step)."""
    model = _qwen3(shape, vocab, dtype, device)
    batch = random_packed_batch(n_seq, seq_len, vocab, 8, device)
    records = []
    for impl in ("pyvf", "full-logits"):
        rec = Record("train_step", impl, "fwdbwd", n_seq * seq_len, model.config.hidden_size, vocab,
                     str(dtype).replace("torch.", ""), None, None, None)
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
            torch.cuda.empty_cache()
    return best


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def plot_records(records: list[Record], path: str, op: str = "token_logprobs", pass_: str = "fwdbwd") -> str | None:
    """Time and peak memory against N, one line per implementation (one panel per H)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib not installed, no chart")
        return None
    rows = [r for r in records if r.op == op and r.pass_ == pass_ and r.ms is not None]
    if not rows:
        return None
    hs = sorted({r.h for r in rows})
    fig, axes = plt.subplots(2, len(hs), figsize=(5 * len(hs), 6), squeeze=False)
    for col, h in enumerate(hs):
        for impl in dict.fromkeys(r.impl for r in rows):
            pts = sorted((r.n, r.ms, r.peak_mem_bytes) for r in rows if r.h == h and r.impl == impl)
            axes[0][col].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
            if all(p[2] is not None for p in pts):
                axes[1][col].plot([p[0] for p in pts], [p[2] / 2**30 for p in pts], marker="o", label=impl)
        axes[0][col].set_title(f"{op} {pass_}, H={h}, V={rows[0].v}", fontsize=9)
        axes[0][col].set_ylabel("ms")
        axes[1][col].set_ylabel("peak GiB")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("N (tokens)")
            ax.grid(alpha=0.3)
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path



def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
    }


def format_table(records: list[Record]) -> str:
    """Markdown table; the ratio column is the time over pyvf's for the same case."""
    head = "| op | impl | pass | n | h | v | dtype | ms | TFLOP/s | peak MiB | vs pyvf |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    pyvf_ms = {(r.op, r.pass_, r.n, r.h, r.v, r.dtype): r.ms for r in records if r.impl == "pyvf" and r.ms}
    for r in records:
        base = pyvf_ms.get((r.op, r.pass_, r.n, r.h, r.v, r.dtype))
        if r.ms is None:
            cells = [r.status, "", "", ""]
        else:
            cells = [f"{r.ms:.3f}", f"{r.tflops:.1f}" if r.tflops else "",
                     f"{r.peak_mem_bytes / 2**20:.0f}" if r.peak_mem_bytes is not None else "",
                     f"{r.ms / base:.2f}x" if base else ""]
        lines.append("| " + " | ".join([r.op, r.impl, r.pass_, str(r.n), str(r.h), str(r.v), r.dtype] + cells) + " |")
    return "\n".join(lines)


def default_plan(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"group_sizes": [10**4, 10**6, 16 * 10**6],
                "logprob_shapes": [(n, h, 151936) for h in (2048, 4096) for n in (4096, 16384, 65536)],
                "dtype": torch.bfloat16,
                "train_steps": [("qwen3-0.6b", 8, 2048), ("qwen3-1.7b", 8, 2048)]}
    return {"group_sizes": [10**4, 10**5, 10**6], "logprob_shapes": [(256, 128, 32000), (1024, 128, 32000)],
            "dtype": torch.float32, "train_steps": [("tiny", 8, 128)]}


def main(device: str | None, sizes: list[int] | None, output: str | None, impls: list[str] | None = None) -> int:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    plan = default_plan(dev)
    if sizes is not None:
        plan["group_sizes"] = sizes
        plan["logprob_shapes"] = [(n, h, v) for n, h, v in plan["logprob_shapes"] if n <= max(sizes)]
    records: list[Record] = []
    for n in plan["group_sizes"]:
        print(f"bench: grouped_advantages / segment_sum, n={n}", flush=True)
        records += bench_groups(n, dev)
    print("bench: verifree_loss", flush=True)
    records += bench_verifree_loss(256, 512, dev)
    for n, h, v in plan["logprob_shapes"]:
        print(f"bench: token_logprobs n={n} h={h} v={v}", flush=True)
        records += bench_logprobs(n, h, v, plan["dtype"], dev, impls=impls)
    for shape, n_seq, seq_len in plan["train_steps"]:
        print(f"bench: training step {shape}, {n_seq} x {seq_len} tokens", flush=True)
        vocab = 151936 if dev.type == "cuda" else 32000
        records += bench_train_step(shape, n_seq, seq_len, dev, plan["dtype"], vocab=vocab)
    env = environment(dev)
    table = format_table(records)
    print(f"\ndevice: {env['device']}  torch {env['torch']}  triton {env['triton']}  date {env['date']}")
    print(table)
    if output:
        with open(output, "w") as f:
            json.dump({**env, "results": [r.to_json() for r in records]}, f, indent=2)
        md = output.rsplit(".", 1)[0] + ".md"
        with open(md, "w") as f:
            f.write(f"# pyvf bench: {env['device']}, {env['date']}\n\n"
                    f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}. "
                    f"Command: `pyvf bench --output {output}`\n\n{table}\n")
        chart = plot_records(records, output.rsplit(".", 1)[0] + ".png")
        print(f"bench: wrote {output}, {md}" + (f", {chart}" if chart else ""))
    return 0
