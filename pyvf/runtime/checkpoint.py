"""Checkpoints: model weights (safetensors), optimizer state, RNG states, data position,
config and the objective's own state (RLPR's filter and score-A cache, NOVER's proxy).
Written into a staging directory, fsynced and renamed into place, so a crash never leaves
a half-written checkpoint; `latest` names the newest complete one, and older ones are
removed only after it is complete."""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

LATEST = "latest"


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


def staging_dir(directory: Path, step: int) -> Path:
    """Where a checkpoint is written before it is renamed into place; the ranks of a
    sharded run each add their optimizer shard here first."""
    return Path(directory) / "checkpoints" / f".tmp-step-{step:06d}"


def save(directory: Path, *, model, model_state: dict, optimizer_state: dict | None, state: TrainerState,
         tokenizer=None, objective_state: dict | None = None, keep: int = 0) -> Path:
    """Writes checkpoints/step-NNNNNN under `directory` atomically; returns its path.
    optimizer_state None means the ranks already staged their shards. `keep` > 0 then
    removes all but the newest `keep`. The checkpoint is also a Hugging Face model
    directory (config.json, model.safetensors, tokenizer), usable as `--model`."""
    root = Path(directory) / "checkpoints"
    final = root / f"step-{state.step:06d}"
    tmp = staging_dir(directory, state.step)
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(tmp), state_dict=model_state, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    torch.save(objective_state or {}, tmp / "objective.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(
        {"step": state.step, "data_position": state.data_position, "config": state.config}, indent=2))
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


def load(path: str | Path, *, rank: int | None = None):
    """(model tensors, optimizer state, TrainerState, objective state) from a checkpoint;
    restores RNG states. With `rank`, the optimizer state is that rank's shard."""
    from safetensors.torch import load_file

    path = resolve(path)
    tensors = load_file(str(path / "model.safetensors"))
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
