"""Whole VeriFree training steps with real sampling, in each rollout mode
(TrainConfig.rollout_mode): sync (sample, then train, on every core), one_step_off and
async (an engine process samples the next batch while this process trains). On a CPU the
engine process and the trainer take one share of the cores each (rollout_threads), sync
takes them all: the comparison is of wall-clock throughput on the same machine.

The model is the shipped model's architecture, initialized at random, so each completion
runs to max_new_tokens (a trained model stops early, and the step would be mostly
training); tokens/s counts sampled tokens per second of whole steps, after two warm-up
steps. The CPU case is sized so that sampling takes about two thirds of a sync step, as it
does at scale; the gain from overlapping is bounded by how well each half scales from one
core to two (here sampling gains about 1.2x, training about 1.8x). `pyvf bench step --rollout-mode sync,one_step_off` picks modes.
"""

from __future__ import annotations

import tempfile
import time

import torch

from pyvf.bench import Record
from pyvf.runtime.model import load_model_and_tokenizer
from pyvf.runtime.rollout.remote import cpu_cores
from pyvf.train.config import from_dict
from pyvf.train.rollouts import ROLLOUT_MODES
from pyvf.train.trainer import Trainer

IMPLS = ROLLOUT_MODES
# (prompts per step, group size, max_new_tokens, timed steps)
CPU_CASE = (2, 8, 176, 8)
GPU_CASE = (64, 8, 1024, 6)
ABOUT = ("step: VeriFree Trainer.step with real sampling (HF engine) on the shipped model's architecture at "
         "random init; CPU: 2 prompts x 8 samples x 176 new tokens, sync on all cores, one_step_off/async with one "
         "engine process and the cores split; ms per step, no TFLOP/s; tokens/s: sampled tokens per second of "
         "whole steps; notes: the ratio to sync, the trainer's and the engine's idle seconds per step")


def _random_builtin(device: torch.device):
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_model_and_tokenizer("builtin")
    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    return fresh.to(device), tokenizer


def run(device: torch.device, sizes: list[int] | None, impls: list[str] | None) -> list[Record]:
    prompts, group, new_tokens, steps = GPU_CASE if device.type == "cuda" else CPU_CASE
    if sizes is not None:
        new_tokens = min(new_tokens, max(sizes))
    records = []
    sync_rate = None
    for mode in impls or IMPLS:
        torch.set_num_threads(cpu_cores())  # each mode starts from the whole machine; the trainer splits it
        model, tokenizer = _random_builtin(device)
        cfg = from_dict(dict(objective="verifree", data="synthetic", n_synthetic=256, prompts_per_step=prompts,
                             group_size=group, max_new_tokens=new_tokens, stop="", lr=1e-6, rollout_mode=mode,
                             max_steps=steps + 2, device=device.type, progress=False, plot=False,
                             rollout_logprob_warn=float("inf"), output_dir=tempfile.mkdtemp(prefix="pyvf-bench-")))
        print(f"bench: step, rollout_mode {mode}, {prompts} x {group} samples of {new_tokens} tokens", flush=True)
        trainer = Trainer.build(cfg, model=model, tokenizer=tokenizer)
        rec = Record("step", mode, "step", prompts * group * new_tokens, model.config.hidden_size,
                     model.config.vocab_size, "float32", None, None, None)
        try:
            for _ in range(2):
                trainer.step()
            sampled, idle_t, idle_e = 0.0, 0.0, 0.0
            start = time.perf_counter()
            for _ in range(steps):
                r = trainer.step()
                sampled += r["reasoning_len"] * prompts * group
                idle_t += r.get("trainer_idle_s", 0.0)
                idle_e += r.get("engine_idle_s", 0.0)
            seconds = time.perf_counter() - start
            rec.ms = 1e3 * seconds / steps
            rec.tokens_per_s = sampled / seconds
            if mode == "sync":
                sync_rate = rec.tokens_per_s
            ratio = f"{rec.tokens_per_s / sync_rate:.2f}x sync; " if sync_rate else ""
            rec.status = (f"ok; {ratio}idle per step: trainer {idle_t / steps:.2f} s, engine {idle_e / steps:.2f} s; "
                          f"threads {torch.get_num_threads()}")
        except Exception as e:  # noqa: BLE001 - a mode's failure is a result to report
            rec.status = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        finally:
            trainer.close()
        records.append(rec)
    torch.set_num_threads(cpu_cores())
    return records
