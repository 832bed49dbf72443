"""Rollout engines, one file each (`hf.py`, the default; `vllm.py`), what they share
(`base.py`) and the seeding that makes a prompt's samples independent of rank and batch
(`seeding.py`). The vLLM engine is imported only where it is asked for."""

from pyvf.runtime.rollout.base import Completion, RolloutEngine, validate_generate_args
from pyvf.runtime.rollout.hf import HFGenerate, greedy
from pyvf.runtime.rollout.seeding import continuation_seed, prompt_seed

__all__ = ["Completion", "HFGenerate", "RolloutEngine", "continuation_seed", "greedy", "prompt_seed",
           "validate_generate_args"]
