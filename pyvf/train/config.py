"""Training configuration: the common keys (`TrainConfig`) and the chosen objective's own
(its `Config` dataclass, with the method's official defaults), loadable from YAML, TOML
or JSON, every key overridable on the command line as `--key value` (dashes or
underscores). Saved configs stay flat: the common keys and the objective's side by side."""

from __future__ import annotations

import dataclasses
import json
import logging
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from pyvf.data.files import DataKeys
from pyvf.objectives import get_objective, objective_names
from pyvf.objectives.base import ObjectiveConfig
from pyvf.options import ConfigError, check, coerce, is_optional, keys, option
from pyvf.runtime.policy import LM_HEAD_PASSES

from pyvf.splice import DEFAULT_ANSWER_TEMPLATE, DEFAULT_MARKER
from pyvf.train.rollouts import ROLLOUT_MODES

REWARD_PASSES = ("auto", "fused", "separate")

log = logging.getLogger("pyvf")


@dataclass
class TrainConfig:
    # what to train (changing one of these on --resume makes it another run: IDENTITY)
    model: str = option("builtin", "builtin (the shipped tiny model), a Hugging Face model directory or a run")
    data: str = option("synthetic", "synthetic, synthetic-long (the worked solution as the reference), "
                                    "synthetic-choice (multiple choice), openended, "
                                    "or a JSONL, JSON, Parquet or CSV file or a `datasets` directory of "
                                    "question/answer rows (verl and TRL rows need no key flags)")
    question_key: str = option("", "the data's question column, a dotted path into nested values (\"\": "
                                   "question, problem, prompt, query or input)")
    answer_key: str = option("", "the data's reference column, a string or a list of equivalent answers, dotted "
                                 "path (\"\": reward_model.ground_truth, answer, solution, ground_truth, reference, "
                                 "target or label)")
    weights_key: str = option("", "the data's per-answer weights column (\"\": weights, when there)")
    split: str = option("", "the split of a `datasets` directory or JSON file that holds several (\"\": train, or "
                            "the only one)")
    objective: str = option("verifree", "verifree jepo rlpr nover verifier pcl rzero selfrubric, or module:Class")
    output_dir: str = option("runs/pyvf", "where checkpoints, metrics.jsonl and the plot go")
    seed: int = option(0, "seeds the data order, the sampling and the initialization")

    # prompts
    prompt_template: str = option("", "the prompt, with {question} (\"\": the objective's, else the task's)")
    chat_template: str = option("auto", "auto: the tokenizer's chat template when it has one; none: plain text",
                                choices=("auto", "none"))
    system_prompt: str = option("", "system turn (chat templates only)")
    assistant_prefix: str = option("", "text that starts the assistant turn, e.g. <think> for thinking models")

    # held-out evaluation during training (pyvf.runtime.evaluation, as `pyvf eval`)
    eval_data: str = option("", "held-out data evaluated every eval_every steps and at the end: a file or "
                                "`datasets` directory (columns found as for data; question_key and answer_key "
                                "apply), or a built-in task's held-out split (\"\": none)")
    eval_every: int = option(0, "evaluate on eval_data every N steps, and after the last (0: only after the last)",
                             minimum=0)
    eval_split: str = option("", "the split of an eval_data `datasets` directory that holds several (\"\": train, or "
                                 "the only one)")
    eval_limit: int = option(500, "evaluate the first N questions of eval_data (0: all)", minimum=0)
    eval_samples: int = option(1, "answers per eval question: avg@k and pass@k", minimum=1)
    eval_temperature: float = option(0.0, "eval decoding: 0 greedy, > 0 sampled (needed for eval_samples > 1)",
                                     minimum=0)

    # rollout
    max_steps: int = option(100, "optimizer steps in all", minimum=1)
    prompts_per_step: int = option(8, "prompts sampled per step (a group of group_size samples each)", minimum=1)
    group_size: int = option(8, "samples per prompt (G); group advantages need >= 2", minimum=2)
    max_new_tokens: int = option(64, "longest completion sampled", minimum=1)
    temperature: float = option(1.0, "sampling temperature (the policy's log-probs use it too)")
    rollout: str = option("hf", "hf (batched Hugging Face sampling) or vllm (in-process vLLM engine)",
                          choices=("hf", "vllm"))
    stop: str = option("</answer>", "generation also stops after this text (\"\": only EOS and length); | separates "
                                    "several")
    vllm_gpu_memory_utilization: float = option(0.3, "share of GPU memory the vLLM engine may take", minimum=0,
                                                maximum=1)
    rollout_mode: str = option("sync", "sync: sample, then train; one_step_off: batch t+1 is sampled with the "
                                       "weights after step t-1 while step t trains (reproducible); async: engines "
                                       "sample continuously with the newest weights, at most max_staleness versions "
                                       "old (engine processes only)", choices=ROLLOUT_MODES)
    rollout_procs: int = option(0, "engine processes that sample while the trainer trains (weights sent over a "
                                   "torch.distributed group); 0: none in sync mode (the trainer samples itself), "
                                   "1 in the others", minimum=0)
    rollout_ranks: int = option(0, "under torchrun: the job's last K ranks sample (an engine each) while the "
                                   "others train with FSDP2; weights go from trainer rank 0 to them over a "
                                   "torch.distributed group (NCCL on GPUs, gloo on CPUs)", minimum=0)
    rollout_threads: int = option(0, "CPU threads of each engine process (0: the cores split evenly between the "
                                     "trainer and the engine processes)", minimum=0)
    max_staleness: int = option(1, "async: the most policy versions a sample may lag the step that trains on it "
                                   "(0: as sync)", minimum=0)
    tis_cap: float = option(2.0, "truncated importance sampling: each sampled token's policy-gradient coefficient "
                                 "is multiplied by min(pi / pi_behaviour, tis_cap) when the sampling policy is not "
                                 "the trained one (a lagging version, vLLM's numerics); 0: off", minimum=0)
    rollout_logprob_warn: float = option(0.05, "warn when engine and trainer log-probs differ by more (mean abs)")
    marker: str = option(DEFAULT_MARKER, "the text that opens the answer; the reference is spliced after it")
    answer_template: str = option(DEFAULT_ANSWER_TEMPLATE, "how a reference is written after the marker ({ref})")
    max_seq_len: int = option(0, "longest training sequence (prompt + reasoning + answer); a longer sample is cut "
                                 "to it, its reward 0 where the answer no longer fits (logged, over_length_frac). "
                                 "0: what the step can produce (prompt + max_new_tokens + the answer), so nothing "
                                 "is cut", minimum=0)
    rubric: str = option("", "a rubric YAML file or built-in name, for selfrubric and --reward self_rubric "
                             "(\"\": story)")
    reward: str = option("", "a verifier spec added to any objective's reward, e.g. \"0.5*majority\"")

    # loss and optimization (official VeriFree: lr 1e-6, betas (0.9, 0.95), clip 1.0)
    lm_head_pass: str = option("fused", "fused (policy_loss, one pass), autograd (token_logprobs + autograd) or "
                               "full_logits (the [T, V] logits, a baseline)", choices=LM_HEAD_PASSES)
    lr: float = option(1e-6, "AdamW learning rate")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    weight_decay: float = option(0.0, "AdamW weight decay")
    grad_clip: float = option(1.0, "gradient-norm clip")
    max_nonfinite_steps: int = option(3, "stop after this many steps in a row whose loss or gradient norm is not "
                                         "finite (each is skipped: no update, nothing pushed to the engine)",
                                      minimum=1)
    micro_batch_tokens: int = option(8192, "token budget of one forward/backward (a sequence is never split)",
                                     minimum=1)
    reward_pass: str = option("auto", "objectives whose rewards come from the gradient forward (verifree): fused "
                                      "(one pass; a group's sequences share a micro-batch), separate (a no-grad "
                                      "forward scores the rewards first, then micro-batches of any sequences) or "
                                      "auto (fused for the groups that fit micro_batch_tokens, separate for the "
                                      "rest)", choices=REWARD_PASSES)

    # runtime
    device: str = option("auto", "auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    dtype: str = option("float32", "float32, or bfloat16: bf16 compute with fp32 master weights, fp32 optimizer "
                                   "state and gradients reduced in fp32 (FSDP2 mixed precision, one process "
                                   "included)", choices=("float32", "bfloat16"))
    activation_checkpointing: str = option("auto", "full: each decoder layer's activations are recomputed in the "
                                           "backward instead of kept (about 1.33x the decoder FLOPs, one layer's "
                                           "activations at a time); none; auto: full on CUDA, none on the CPU",
                                           choices=("auto", "full", "none"))
    logprob_backend: str = option("auto", "the lm_head ops' backend: auto, cpu, cuda or reference")
    n_synthetic: int = option(5000, "size of the synthetic training set", minimum=1)
    save_every: int = option(0, "checkpoint every N steps (0: by time and at the end only)", minimum=0)
    save_every_minutes: float = option(30.0, "also checkpoint when this long has passed since the last one "
                                             "(0: never by time), so a crash loses at most this much work",
                                       minimum=0)
    keep_checkpoints: int = option(3, "keep the newest N checkpoints, removing older ones once a new one is "
                                      "complete (0: keep all)", minimum=0)
    async_checkpoint: bool = option(False, "write the DCP shards in a background thread: training waits only for "
                                           "the copy to memory (the write completes before the next save)")
    stop_after: int = option(0, "stop (with a checkpoint) after this step, as if interrupted")
    log_every: int = option(1, "log a line every N steps when the progress bar is off")
    progress: bool = option(True, "a progress bar")
    plot: bool = option(True, "metrics.png at the end")

    # The chosen objective's keys (its Config, e.g. VeriFreeConfig): set by from_dict.
    objective_config: ObjectiveConfig | None = dataclasses.field(default=None, repr=False)

    # Keys that make a run another run: --resume refuses to change them without --force-override.
    IDENTITY: typing.ClassVar[tuple[str, ...]] = ("objective", "model", "data", "group_size", "seed")
    # Keys that belong to one invocation and never carry over to a resumed run.
    PER_INVOCATION: typing.ClassVar[tuple[str, ...]] = ("stop_after",)

    def __post_init__(self):
        if self.objective_config is None:
            try:
                self.objective_config = get_objective(self.objective).Config()
            except ValueError:
                pass  # validate() reports it

    def validate(self) -> "TrainConfig":
        try:
            cls = get_objective(self.objective)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not isinstance(self.objective_config, cls.Config):
            raise ConfigError(f"objective_config must be a {cls.Config.__name__} for objective {self.objective}, "
                              f"got {type(self.objective_config).__name__}")
        if self.group_size < 2:
            raise ConfigError(f"group_size must be >= 2 for group advantages, got {self.group_size}")
        check(self)
        check(self.objective_config)
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.prompt_template and "{question}" not in self.prompt_template:
            raise ConfigError("prompt_template must contain {question}")
        if self.max_new_tokens >= self.micro_batch_tokens:
            raise ConfigError(f"micro_batch_tokens ({self.micro_batch_tokens}) must be larger than max_new_tokens "
                              f"({self.max_new_tokens}): a sequence (prompt + completion + answer) is never split "
                              f"across micro-batches")
        if self.rollout_ranks and self.rollout_procs:
            raise ConfigError(f"rollout_ranks ({self.rollout_ranks}, torchrun ranks that sample) and rollout_procs "
                              f"({self.rollout_procs}, processes pyvf starts) are two placements: set one")
        if self.eval_samples > 1 and self.eval_temperature == 0:
            raise ConfigError(f"eval_samples {self.eval_samples} at eval_temperature 0 are copies of the greedy "
                              f"answer: set eval_temperature > 0")
        if self.eval_data == "synthetic-long":
            raise ConfigError("eval_data synthetic-long: its reference is a worked solution, which no answer format "
                              "grades; evaluate on synthetic (the same questions) or with pyvf eval --data "
                              "synthetic-long (the reference's likelihood)")
        if self.eval_every and not self.eval_data:
            raise ConfigError(f"eval_every {self.eval_every} needs eval_data (the held-out questions)")
        if self.answer_template.count("{ref}") != 1:
            raise ConfigError(f"answer_template must contain {{ref}} exactly once, got {self.answer_template!r}")
        return self

    def data_keys(self) -> DataKeys:
        return DataKeys(question=self.question_key, answer=self.answer_key, weights=self.weights_key, split=self.split)

    def eval_keys(self) -> DataKeys:
        return DataKeys(question=self.question_key, answer=self.answer_key, split=self.eval_split)

    def engine_procs(self) -> int:
        """Engines in processes of their own: rollout_ranks, rollout_procs, or 1 when the
        mode runs ahead and both are 0."""
        return self.rollout_ranks or self.rollout_procs or (1 if self.rollout_mode != "sync" else 0)

    def stop_strings(self) -> list[str]:
        return [s for s in self.stop.split("|") if s]

    def to_dict(self) -> dict:
        """Flat: the common keys and the objective's."""
        common = {name: getattr(self, name) for name in keys(TrainConfig)}
        return {**common, **dataclasses.asdict(self.objective_config or ObjectiveConfig())}


def objective_keys(name: str) -> dict[str, dataclasses.Field]:
    return keys(get_objective(name).Config)


def owners(key: str) -> list[str]:
    """The registered objectives that have `key`."""
    return [name for name in objective_names() if key in objective_keys(name)]


def from_dict(values: dict, base: TrainConfig | None = None) -> TrainConfig:
    """`values` (from a file or the command line; flat keys, dashes or underscores) on top
    of `base` (default: the defaults). A key is a common key or one of the objective's."""
    values = {key.replace("-", "_"): value for key, value in values.items()}
    common = keys(TrainConfig)
    cfg = dataclasses.replace(base) if base is not None else TrainConfig()
    if "objective" in values:
        cfg.objective = coerce(TrainConfig, "objective", values["objective"])
    try:
        config_cls = get_objective(cfg.objective).Config
    except ValueError as e:
        raise ConfigError(str(e)) from None
    same = base is not None and isinstance(base.objective_config, config_cls)
    objective_config = dataclasses.replace(base.objective_config) if same else config_cls()
    own = keys(config_cls)
    for name, value in values.items():
        if name in common:
            setattr(cfg, name, coerce(TrainConfig, name, value))
        elif name in own:
            setattr(objective_config, name, coerce(config_cls, name, value))
        elif owners(name):
            # A key of other objectives: one config can serve a sweep over objectives.
            log.warning("config: ignoring %s, a key of objective %s, not of %s", name, ", ".join(owners(name)),
                        cfg.objective)
        else:
            raise ConfigError(f"unknown config key {name!r}")
    cfg.objective_config = objective_config
    return cfg


def saved_values(values: dict, objective: str) -> tuple[dict, list[str]]:
    """The keys of a saved config that this version and `objective` know, and the names of
    those left out. Configs saved before objectives owned their keys hold every method's
    keys, None standing for "the objective's default"."""
    known = {**keys(TrainConfig), **objective_keys(objective)}
    owner = {name: (TrainConfig if name in keys(TrainConfig) else get_objective(objective).Config) for name in known}
    kept = {k: v for k, v in values.items() if k in known and (v is not None or is_optional(owner[k], k))}
    return kept, sorted(k for k in values if k not in known)


def load_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".toml":
        data = tomllib.loads(text)
    elif path.suffix in (".yaml", ".yml"):
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


__all__ = ["ConfigError", "TrainConfig", "from_dict", "load_file", "objective_keys", "owners",
           "parse_overrides", "saved_values"]
