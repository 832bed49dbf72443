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
    # what to train
    model: str = "builtin"               # "builtin" (the shipped tiny model) or a Hugging Face model directory
    data: str = "synthetic"              # "synthetic" or a JSONL file with question/answer rows
    objective: str = "verifree"           # verifree, rlpr, nover or verifier
    output_dir: str = "runs/pyvf"
    seed: int = 0

    # rollout
    max_steps: int = 100
    prompts_per_step: int = 8
    group_size: int = 8                  # samples per prompt (G); RLOO needs >= 2
    max_new_tokens: int = 64
    temperature: float = 1.0
    prompt_template: str = ""            # "" = the synthetic task's template; must contain {question}
    marker: str = "<answer"
    answer_template: str = "> \\boxed{{{ref}}} </answer>"
    max_seq_len: int = 512               # prompt + reasoning + answer; longer spliced sequences get reward 0

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

    objectives: typing.ClassVar[tuple[str, ...]] = ("verifree", "rlpr", "nover", "verifier")

    def validate(self) -> "TrainConfig":
        if self.objective not in self.objectives:
            raise ConfigError(f"objective must be one of {', '.join(self.objectives)}, got {self.objective!r}")
        if self.group_size < 2:
            raise ConfigError(f"group_size must be >= 2 for RLOO advantages, got {self.group_size}")
        for name in ("max_steps", "prompts_per_step", "max_new_tokens", "max_seq_len", "micro_batch_tokens",
                     "n_synthetic"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.prompt_template and "{question}" not in self.prompt_template:
            raise ConfigError("prompt_template must contain {question}")
        if self.answer_template.count("{ref}") != 1:
            raise ConfigError(f"answer_template must contain {{ref}} exactly once, got {self.answer_template!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _coerce(name: str, value):
    hint = typing.get_type_hints(TrainConfig)[name]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
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
