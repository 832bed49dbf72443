"""Training configuration: one dataclass, loadable from YAML or TOML, every key
overridable on the command line as `--key value` (dashes or underscores)."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A configuration problem, reported as one line and exit code 2 by the CLI."""


@dataclass
class TrainConfig:
    # what to train (changing one of these on --resume makes it another run: IDENTITY)
    model: str = "builtin"               # "builtin" (the shipped tiny model) or a Hugging Face model directory
    data: str = "synthetic"              # "synthetic" or a JSONL file with question/answer rows
    objective: str = "verifree"          # verifree rlpr nover verifier pcl rzero selfrubric, or module:Class
    output_dir: str = "runs/pyvf"
    seed: int = 0

    # prompts
    prompt_template: str = ""            # "" = the synthetic task's template; must contain {question}
    chat_template: str = "auto"          # auto: apply the tokenizer's chat template when it has one; none: plain text
    system_prompt: str = ""              # system turn (chat templates only)
    assistant_prefix: str = ""           # text that starts the assistant turn, e.g. <think> for thinking models

    # rollout
    max_steps: int = 100
    prompts_per_step: int = 8
    group_size: int = 8                  # samples per prompt (G); RLOO needs >= 2
    max_new_tokens: int = 64
    temperature: float = 1.0
    rollout: str = "hf"                  # hf (batched Hugging Face sampling) or vllm (in-process vLLM engine)
    stop: str = "</answer>"              # generation also stops after this text ("" = only EOS / length); | separates several
    vllm_gpu_memory_utilization: float = 0.3  # share of GPU memory the vLLM engine may take
    rollout_logprob_warn: float = 0.05   # warn when engine and trainer log-probs differ by more (mean abs)
    marker: str = "<answer"
    answer_template: str = "> \\boxed{{{ref}}} </answer>"
    max_seq_len: int = 512               # prompt + reasoning + answer; longer spliced sequences get reward 0

    # loss (None: the objective's official default, see docs/algorithms.md)
    loss_agg: str | None = None          # seq_mean_token_sum, token_mean or seq_mean_token_mean
    lm_head_pass: str = "fused"          # fused (policy_loss, one pass) or autograd (token_logprobs + autograd)
    clip_low: float | None = None        # PPO ratio clip below 1 (rlpr: 0.2)
    clip_high: float | None = None       # PPO ratio clip above 1 (rlpr: 0.27)
    entropy_coeff: float | None = None   # entropy bonus (rlpr: 0.001)
    kl_beta: float | None = None         # k3 KL to the objective's reference model (nover: 0.1, to its proxy)
    filter_beta: float = 0.5             # rlpr: keep a group iff its reward std >= filter_beta * EMA
    filter_rounds: int = 4               # rlpr: extra sampling rounds at most to refill filtered groups
    proxy_sync_every: int = 100          # nover: proxy <- alpha proxy + (1 - alpha) policy every N steps
    proxy_alpha: float = 0.9
    pcl_accuracy: str = "verifier"       # pcl: accuracy target, verifier (rule checker) or verifree (pi(y*|x,z))
    pcl_sft_answer: float = 0.1          # pcl: SFT weight on the reasoning and answer of correct samples
    pcl_sft_evaluation: float = 0.1      # pcl: SFT weight on the evaluation written from the true rewards
    pcl_evaluation_tokens: int = 48      # pcl: most tokens sampled after the answer (evaluation and reward)
    solver_model: str = ""               # rzero: the frozen solver that answers the challenger's questions ("" = model)
    solver_samples: int = 10             # rzero: answers per question for the majority vote (m)
    rubric: str = ""                     # selfrubric: a rubric YAML file or built-in name ("" = story)
    rater: str = "self"                  # selfrubric: self (rates inside its completion), frozen or proxy (a copy)
    ranking_weight: float = 0.5          # selfrubric: weight of the within-group ranking term
    reward: str = ""                     # a verifier spec added to any objective's reward, e.g. "0.5*majority"

    # optimization (official VeriFree: lr 1e-6, betas (0.9, 0.95), clip 1.0)
    lr: float = 1e-6
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_tokens: int = 8192       # token budget of one forward/backward; groups never split

    # runtime
    device: str = "auto"                 # auto, cpu, cuda
    dtype: str = "float32"               # float32 or bfloat16 (weights and compute)
    logprob_backend: str = "auto"
    n_synthetic: int = 5000              # size of the synthetic training set
    save_every: int = 0                  # checkpoint every N steps (0: only at the end)
    stop_after: int = 0                  # stop (with a checkpoint) after this step, as if interrupted
    log_every: int = 1
    progress: bool = True
    plot: bool = True

    # Keys that make a run another run: --resume refuses to change them without --force-override.
    IDENTITY: typing.ClassVar[tuple[str, ...]] = ("objective", "model", "data", "group_size", "seed")
    # Keys that belong to one invocation and never carry over to a resumed run.
    PER_INVOCATION: typing.ClassVar[tuple[str, ...]] = ("stop_after",)

    def validate(self) -> "TrainConfig":
        from pyvf.objectives import get_objective
        from pyvf.objectives.base import LOSS_AGGREGATIONS

        try:
            get_objective(self.objective)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.group_size < 2:
            raise ConfigError(f"group_size must be >= 2 for group advantages, got {self.group_size}")
        for name in ("max_steps", "prompts_per_step", "max_new_tokens", "max_seq_len", "micro_batch_tokens",
                     "n_synthetic", "proxy_sync_every", "pcl_evaluation_tokens", "solver_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.filter_rounds < 0:
            raise ConfigError(f"filter_rounds must be >= 0, got {self.filter_rounds}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        for name in ("clip_low", "clip_high", "entropy_coeff", "kl_beta", "pcl_sft_answer", "pcl_sft_evaluation",
                     "ranking_weight"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and value < float("inf")):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        if not 0 <= self.proxy_alpha <= 1:
            raise ConfigError(f"proxy_alpha must be in [0, 1], got {self.proxy_alpha}")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ConfigError(f"vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        if self.prompt_template and "{question}" not in self.prompt_template:
            raise ConfigError("prompt_template must contain {question}")
        if self.answer_template.count("{ref}") != 1:
            raise ConfigError(f"answer_template must contain {{ref}} exactly once, got {self.answer_template!r}")
        if self.loss_agg is not None and self.loss_agg not in LOSS_AGGREGATIONS:
            raise ConfigError(f"loss_agg must be one of {', '.join(LOSS_AGGREGATIONS)}, got {self.loss_agg!r}")
        choices = {"dtype": ("float32", "bfloat16"), "device": ("auto", "cpu", "cuda"), "rollout": ("hf", "vllm"),
                   "lm_head_pass": ("fused", "autograd"), "chat_template": ("auto", "none"),
                   "pcl_accuracy": ("verifier", "verifree"), "rater": ("self", "frozen", "proxy")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        return self

    def stop_strings(self) -> list[str]:
        return [s for s in self.stop.split("|") if s]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _coerce(name: str, value):
    hint = typing.get_type_hints(TrainConfig)[name]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "default")):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if hint is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be {hint.__name__}, got {value!r}") from None


def from_dict(values: dict, base: TrainConfig | None = None) -> TrainConfig:
    known = _fields()
    cfg = dataclasses.replace(base) if base is not None else TrainConfig()
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"unknown config key {key!r}")
        setattr(cfg, name, _coerce(name, value))
    return cfg


def load_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    elif path.suffix == ".json":
        data = json.loads(text)
    else:
        raise ConfigError(f"config file must be .yaml, .yml, .toml or .json, got {path.name}")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


def parse_overrides(args: list[str]) -> dict:
    """['--max-steps', '2', '--seed=5'] -> {'max_steps': '2', 'seed': '5'}."""
    out = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"expected --key value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"--{key} needs a value")
            value = args[i + 1]
            i += 1
        out[key.replace("-", "_")] = value
        i += 1
    return out


def help_text() -> str:
    lines = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  --{f.name.replace('_', '-'):<22} (default: {default!r})")
    return "\n".join(lines)


__all__ = ["TrainConfig", "ConfigError", "from_dict", "load_file", "parse_overrides", "help_text"]
