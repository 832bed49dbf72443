"""One VeriFree training step on one group of long completions (`Trainer.step`: splice,
reward pass, packed forward and backward with activation checkpointing, AdamW), in each
reward-pass mode (TrainConfig.reward_pass):

- fused: the whole group in one micro-batch, the rewards read in the gradient forward;
- separate: a no-grad forward scores the rewards first (answer rows only through the
  lm_head), then one micro-batch per completion;
- auto: fused where a group fits the budget, separate where not; with the budget of one
  completion used here, it separates the group (the same work as `separate`).

The rollout replays one completion (`ReplayEngine`), so the step times training alone.
Peak memory is what decides whether a group of long completions fits at all; the time
shows what the separate pass costs (about one more forward, without the backward).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from pyvf.assets import load_tokenizer
from pyvf.bench import Record, default_dtype, dtype_name, measure
from pyvf.bench.memory import fill_cpu_memory
from pyvf.bench.train_step import ReplayEngine
from pyvf.train.config import from_dict
from pyvf.train.trainer import Trainer

IMPLS = ("fused", "separate", "auto")
# (hidden, layers, heads, completions, completion tokens); the shipped tokenizer's vocabulary.
CPU_CASES = [(256, 4, 4, 8, 4096)]
GPU_CASES = [(2048, 28, 16, 8, 16384)]
ABOUT = ("long_group: one VeriFree Trainer.step on one group of long completions (replayed), activation "
         "checkpointing on; CPU: fp32, hidden 256, 4 layers, 8 completions of 4k tokens; GPU: bf16, the 1.7B shape, "
         "8 x 16k. fused: the group in one micro-batch; separate/auto: a no-grad reward pass, then one micro-batch "
         "per completion. ms per step, no TFLOP/s; peak MiB: extra memory of one step (CPU: resident, fresh process "
         "per mode)")
PROMPT_ROOM = 256  # a micro-batch of one completion holds it, its prompt and its answer


def _trainer(mode: str, hidden: int, layers: int, heads: int, completions: int, tokens: int, dtype: torch.dtype,
             device: torch.device) -> Trainer:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = load_tokenizer()
    work = Path(tempfile.mkdtemp(prefix="pyvf-bench-long-"))
    data = work / "one.jsonl"
    data.write_text(json.dumps({"question": "What is 7 - 6? Think it through at length.", "answer": "1"}) + "\n")
    budget = completions * (tokens + PROMPT_ROOM) if mode == "fused" else tokens + PROMPT_ROOM
    cfg = from_dict(dict(objective="verifree", data=str(data), group_size=completions, prompts_per_step=1,
                         max_new_tokens=tokens, micro_batch_tokens=budget, reward_pass=mode,
                         activation_checkpointing="full", device=device.type, lr=1e-6,
                         # bf16: FSDP2 mixed precision over the fp32 master weights, as training runs
                         dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
                         rollout_logprob_warn=float("inf"),  # the replayed log-probs are made up
                         progress=False, plot=False, save_every_minutes=0, output_dir=str(work / "run")))
    config = Qwen3Config(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=max(heads // 2, 1), intermediate_size=3 * hidden,
                         head_dim=hidden // heads, max_position_embeddings=2 * (tokens + PROMPT_ROOM))
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config)
    model.config.use_cache = False
    return Trainer.build(cfg, engine=ReplayEngine(tok, tokens), model=model, tokenizer=tok)


def memory_call(impl: str, hidden: int, layers: int, heads: int, completions: int, tokens: int, dtype: str,
                device: str):
    """The case pyvf/bench/memory.py measures in its fresh process."""
    trainer = _trainer(impl, hidden, layers, heads, completions, tokens, getattr(torch, dtype), torch.device(device))
    return trainer.step, list(trainer.policy.parameters())


def run(device: torch.device, sizes: list[int] | None, impls: list[str] | None) -> list[Record]:
    dtype = default_dtype(device)
    records = []
    cases = GPU_CASES if device.type == "cuda" else CPU_CASES
    for hidden, layers, heads, completions, tokens in cases:
        if sizes is not None and tokens > max(sizes):
            continue
        print(f"bench: long_group, {completions} completions of {tokens} tokens, {layers} layers of {hidden}",
              flush=True)
        for impl in impls or IMPLS:
            trainer = _trainer(impl, hidden, layers, heads, completions, tokens, dtype, device)
            rec = Record("long_group", impl, "step", completions * tokens, hidden, len(load_tokenizer()),
                         dtype_name(dtype), None, None, None)
            last: dict = {}

            def call(trainer=trainer, last=last):
                last.update(trainer.step())

            records.append(measure(rec, call, device, repeats=1, warmup=1))
            if rec.ms is not None:
                rec.tokens_per_s = completions * tokens / (rec.ms * 1e-3)
                rec.status = (f"ok; reward pass {1e3 * last['time_reward_pass']:.0f} ms, "
                              f"{last['micro_batches']:.0f} micro-batches")
            del trainer
    if device.type == "cpu":
        by_tokens = {c[3] * c[4]: c for c in cases}
        fill_cpu_memory(records, __name__, lambda r: [*by_tokens[r.n], r.dtype, "cpu"])
    return records
