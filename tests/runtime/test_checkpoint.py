import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pyvf.runtime import checkpoint


def _complete(root: Path, step: int) -> None:
    (root / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
    (root / "checkpoints" / "latest").write_text(f"step-{step:06d}")


def test_prune_keeps_the_newest_and_never_latest(tmp_path):
    for step in range(1, 6):
        _complete(tmp_path, step)
    removed = checkpoint.prune(tmp_path, keep=2)
    assert [p.name for p in removed] == ["step-000001", "step-000002", "step-000003"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-000004", "step-000005"]
    (tmp_path / "checkpoints" / "latest").write_text("step-000004")  # latest is never removed
    assert checkpoint.prune(tmp_path, keep=0) == []  # 0 keeps all
    assert checkpoint.prune(tmp_path, keep=1) == []


def test_what_an_interrupted_save_left_is_removed(tmp_path):
    _complete(tmp_path, 3)
    stage = checkpoint.staging_dir(tmp_path, 4)
    stage.mkdir(parents=True)
    (stage / "model.safetensors").write_bytes(b"half")
    (tmp_path / "checkpoints" / ".latest.tmp").write_text("step-000004")
    removed = checkpoint.remove_staging(tmp_path)
    assert {p.name for p in removed} == {".tmp-step-000004", ".latest.tmp"}
    assert checkpoint.resolve(tmp_path).name == "step-000003"
    assert not stage.exists()


def test_a_checkpoint_from_before_dcp_still_loads(tmp_path):
    """model.safetensors and optimizer.pt (or one optimizer-rank{r}.pt per rank)."""
    _complete(tmp_path, 1)
    ckpt = tmp_path / "checkpoints" / "step-000001"
    save_file({"w": torch.ones(2)}, str(ckpt / "model.safetensors"))
    torch.save({"state": {}, "param_groups": []}, ckpt / "optimizer.pt")
    torch.save(checkpoint._rng_state(), ckpt / "rng.pt")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1, "data_position": 2, "config": {}}))
    assert not checkpoint.is_sharded(ckpt)
    tensors, optimizer_state, state, objective_state = checkpoint.load(tmp_path)
    assert torch.equal(tensors["w"], torch.ones(2)) and optimizer_state == {"state": {}, "param_groups": []}
    assert (state.step, state.data_position, objective_state) == (1, 2, {})
    assert torch.equal(checkpoint.load_model_tensors(ckpt)["w"], torch.ones(2))
    with pytest.raises(ValueError, match="no optimizer-rank1.pt"):
        checkpoint.load(tmp_path, rank=1)
