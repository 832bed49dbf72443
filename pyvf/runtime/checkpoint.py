"""Checkpoints: model weights and optimizer state (torch.distributed.checkpoint, DCP, in
`dcp/`), RNG states, data position, config and the objective's own state (RLPR's filter and
score-A cache, NOVER's proxy). Every rank writes its own shards of the model and optimizer
into `dcp/` (nothing is gathered on one rank), keyed by parameter name, so a checkpoint
resumes on any number of processes. Written into a staging directory, fsynced and renamed
into place, so a crash never leaves a half-written checkpoint; `latest` names the newest
complete one, and older ones are removed only after it is complete. Checkpoints written
before DCP (model.safetensors, optimizer.pt or optimizer-rank{r}.pt) still load."""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

LATEST = "latest"
DCP = "dcp"                    # the sharded model and optimizer state, inside a checkpoint
MODEL_PREFIX = "model.model."  # DCP key of a weight: the "model" entry, the policy's `model`, the HF name


@dataclass
class TrainerState:
    step: int                 # optimizer steps completed
    data_position: int        # prompts consumed from the data order
    config: dict


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps([np_state[0], np_state[1].tolist(), *np_state[2:]]),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = json.loads(state["numpy"])
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


@contextmanager
def _single_process_is_intended():
    """DCP warns on every save and load without a process group; one process without
    one is intended here (a single-process run, `--model CHECKPOINT`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")
        yield


def staging_dir(directory: Path, step: int) -> Path:
    """Where a checkpoint is written before it is renamed into place; the ranks of a
    run each write their shards into its dcp/ first."""
    return Path(directory) / "checkpoints" / f".tmp-step-{step:06d}"


def save_shards(directory: Path, step: int, policy: torch.nn.Module, optimizer, *, use_async: bool = False,
                async_group=None):
    """Every rank: writes its shards of the policy and optimizer state into the staging
    directory's dcp/ (collective when a process group exists). With `use_async` the state
    is copied to memory and written by a background thread, whose collectives go over
    `async_group` (a group of their own, so they never meet training's): returns the
    future to wait on before `complete`, else None."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    target = staging_dir(directory, step) / DCP
    target.mkdir(parents=True, exist_ok=True)
    model_state, optimizer_state = get_state_dict(policy, optimizer)
    state = {"model": model_state, "optim": optimizer_state}
    alone = not torch.distributed.is_initialized()  # one process without a group: DCP's no_dist
    with _single_process_is_intended():
        if use_async:
            return dcp.async_save(state, checkpoint_id=str(target), process_group=async_group, no_dist=alone)
        dcp.save(state, checkpoint_id=str(target), no_dist=alone)
    return None


def stage_state(directory: Path, *, state: TrainerState, objective_state: dict | None = None,
                rollout_state: dict | None = None) -> None:
    """Rank 0, when the shards are saved: the RNG states, the objective's state, the
    rollouts in flight (rollout_mode one_step_off, async) and the data position of this
    moment (an async save completes later, after training moved on)."""
    tmp = staging_dir(directory, state.step)
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), tmp / "rng.pt")
    torch.save(objective_state or {}, tmp / "objective.pt")
    if rollout_state is not None:
        torch.save(rollout_state, tmp / "rollout.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(
        {"step": state.step, "data_position": state.data_position, "config": state.config}, indent=2))


def complete(directory: Path, step: int, *, model, tokenizer=None, keep: int = 0) -> Path:
    """Rank 0, once every rank's shards are written and `stage_state` ran: adds config and
    tokenizer and renames checkpoints/.tmp-step-NNNNNN to step-NNNNNN atomically; returns
    its path. `keep` > 0 then removes all but the newest `keep`. With its config.json and
    tokenizer the checkpoint is also usable as `--model` (see load_model_tensors)."""
    root = Path(directory) / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = staging_dir(directory, step)
    for needed in (f"{DCP}/.metadata", "trainer_state.json"):
        if not (tmp / needed).is_file():
            raise ValueError(f"{tmp}: no {needed} (save_shards on every rank and stage_state come first)")
    model.config.save_pretrained(str(tmp))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(final.name)
    _fsync_tree(pointer)
    os.replace(pointer, root / LATEST)
    _fsync_tree(root)  # the renames themselves
    prune(directory, keep)
    return final


def write_atomic(path: str | Path, text: str) -> Path:
    """Writes `text` to a temporary file beside `path`, then renames it into place: a
    reader (or a run killed mid-write) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _fsync_tree(path: Path) -> None:
    """Flushes a file, or a directory and everything in it, to the disk."""
    paths = [path] if path.is_file() else [*sorted(p for p in path.rglob("*")), path]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def prune(directory: Path, keep: int) -> list[Path]:
    """Removes all but the newest `keep` complete checkpoints (never the one `latest`
    names; keep 0 keeps all); returns what it removed."""
    if keep < 1:
        return []
    root = Path(directory) / "checkpoints"
    latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    removed = [p for p in done[:max(len(done) - keep, 0)] if p.name != latest]
    for p in removed:
        shutil.rmtree(p)
    return removed


def remove_staging(directory: Path) -> list[Path]:
    """Removes what an interrupted save left (staging directories, a pointer never
    renamed); `latest` still names the last complete checkpoint."""
    root = Path(directory) / "checkpoints"
    stale = sorted(root.glob(".tmp-step-*")) + sorted(root.glob(f".{LATEST}.tmp"))
    for p in stale:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return stale


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (then its latest checkpoint)."""
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    pointer = path / "checkpoints" / LATEST
    if pointer.is_file():
        return path / "checkpoints" / pointer.read_text().strip()
    raise ValueError(f"--resume {path}: no checkpoint there (expected trainer_state.json or checkpoints/{LATEST})")


def run_dir(path: str | Path) -> Path:
    """The run directory a checkpoint belongs to (where its metrics and checkpoints live)."""
    ckpt = resolve(path)
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt


def saved_config(path: str | Path) -> dict:
    """The config a checkpoint (or a run's latest checkpoint) was trained with."""
    return json.loads((resolve(path) / "trainer_state.json").read_text())["config"]


def is_sharded(path: str | Path) -> bool:
    """Whether a checkpoint directory holds DCP shards (else it is a legacy one)."""
    return (Path(path) / DCP / ".metadata").is_file()


def load_model_tensors(path: str | Path) -> dict:
    """The full model weights of a checkpoint (HF names, CPU tensors as saved), read by
    this process alone: no process group is needed, and none is used if one exists (a
    caller on one rank only must not wait for the others)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    if not is_sharded(path):
        from safetensors.torch import load_file

        return load_file(str(path / "model.safetensors"))
    reader = FileSystemReader(str(path / DCP))
    meta = reader.read_metadata().state_dict_metadata
    tensors = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
               if k.startswith(MODEL_PREFIX) and isinstance(m, TensorStorageMetadata)}
    if not tensors:
        raise ValueError(f"{path / DCP}: no model weights (no key starts with {MODEL_PREFIX!r})")
    with _single_process_is_intended():
        dcp.load(tensors, storage_reader=reader, no_dist=True)
    return {k.removeprefix(MODEL_PREFIX): v for k, v in tensors.items()}


def load_optimizer_shards(path: str | Path, policy: torch.nn.Module, optimizer) -> None:
    """Every rank: this rank's part of the optimizer state of a DCP checkpoint, whatever
    the number of processes that wrote it (collective when a process group exists)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    # AdamW creates its state at the first step; get_optimizer_state_dict makes it with a
    # zero-gradient step at lr 0 (parameters unchanged), so DCP has tensors to load into.
    state = {"optim": get_optimizer_state_dict(policy, optimizer)}
    with _single_process_is_intended():
        dcp.load(state, checkpoint_id=str(Path(path) / DCP), no_dist=not torch.distributed.is_initialized())
    set_optimizer_state_dict(policy, optimizer, state["optim"])


def load_rollout_state(path: str | Path) -> dict:
    """The rollouts a checkpoint kept in flight ({} when it kept none)."""
    file = resolve(path) / "rollout.pt"
    return torch.load(file, weights_only=True) if file.is_file() else {}


def load(path: str | Path, *, rank: int | None = None):
    """(model tensors, optimizer state, TrainerState, objective state) from a checkpoint;
    restores RNG states. A DCP checkpoint gives None for the model and optimizer (the
    trainer loads them with load_model_tensors and load_optimizer_shards); a legacy one
    gives its tensors, and with `rank` that rank's optimizer shard."""
    path = resolve(path)
    tensors = optimizer_state = None
    if not is_sharded(path):
        tensors = load_model_tensors(path)
        optimizer_file = path / ("optimizer.pt" if rank is None else f"optimizer-rank{rank}.pt")
        if not optimizer_file.is_file():
            raise ValueError(f"{path} has no {optimizer_file.name}: resume with the number of processes that wrote it")
        optimizer_state = torch.load(optimizer_file, weights_only=True)
    rng = torch.load(path / "rng.pt", weights_only=True)
    meta = json.loads((path / "trainer_state.json").read_text())
    objective_file = path / "objective.pt"
    objective_state = torch.load(objective_file, weights_only=True) if objective_file.is_file() else {}
    _set_rng_state(rng)
    return tensors, optimizer_state, TrainerState(meta["step"], meta["data_position"], meta["config"]), objective_state
