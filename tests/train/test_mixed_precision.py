"""`dtype: bfloat16` is bf16 compute with fp32 master weights (FSDP2 mixed precision, in
one process too): at the official learning rate the masters move as in an fp32 run,
checkpoints keep them, a run resumes bit-exactly, and `pyvf export` writes bf16 weights."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from pyvf.cli import main as cli
from pyvf.runtime import checkpoint
from pyvf.runtime.model import BUILTIN_MODEL_DIR

FAST = ["--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "40", "--progress", "false",
        "--plot", "false", "--n-synthetic", "64", "--lr", "1e-6"]


def weights(run: Path) -> dict:
    return checkpoint.load_model_tensors(checkpoint.resolve(run))


def test_bf16_moves_the_fp32_masters_as_fp32_does(tmp_path):
    start = load_file(str(BUILTIN_MODEL_DIR / "model.safetensors"))
    runs = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        assert cli(["train", "--dtype", dtype, "--max-steps", "3", "--output-dir", str(out), *FAST]) == 0
        runs[dtype] = weights(out)
    bf16 = runs["bfloat16"]
    assert all(t.dtype == torch.float32 for t in bf16.values())  # the checkpoint holds the masters
    matrices = [k for k, t in start.items() if t.dim() == 2]
    moved = sum(int((bf16[k] != start[k]).sum()) for k in matrices) / sum(start[k].numel() for k in matrices)
    assert moved > 0.9, f"only {moved:.1%} of the matrix weights moved"  # pure bf16 AdamW moves ~1%
    norm = {d: sum(float((w[k] - start[k]).double().norm() ** 2) for k in matrices) ** 0.5 for d, w in runs.items()}
    assert 0.5 < norm["bfloat16"] / norm["float32"] < 2, norm


def test_bf16_resumes_bit_exactly_and_exports(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["--dtype", "bfloat16", "--max-steps", "3", *FAST]
    assert cli(["train", *common, "--output-dir", str(full)]) == 0
    assert cli(["train", *common, "--output-dir", str(part), "--stop-after", "1"]) == 0
    assert cli(["train", "--resume", str(part)]) == 0
    a, b = weights(full), weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (full, part)]
    assert losses[0] == losses[1]

    from transformers import AutoModelForCausalLM

    out = tmp_path / "served"
    assert cli(["export", str(full), str(out), "--dtype", "bfloat16"]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16
    served = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(served[k], a[k].to(torch.bfloat16)) for k in served)


def test_activation_checkpointing_changes_nothing_but_memory(tmp_path):
    runs = {}
    for mode in ("none", "full"):
        out = tmp_path / mode
        assert cli(["train", "--activation-checkpointing", mode, "--max-steps", "2", "--output-dir", str(out),
                    *FAST[:-2], "--lr", "1e-4"]) == 0
        runs[mode] = (weights(out), [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text()
                                     .splitlines()])
    (a, loss_a), (b, loss_b) = runs["none"], runs["full"]
    assert loss_a == loss_b
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def test_activation_checkpointing_recomputes_each_layer(tmp_path):
    from pyvf.packing import Sequence, pack
    from pyvf.runtime.model import decoder_hidden_states
    from pyvf.train.config import from_dict
    from pyvf.train.trainer import Trainer

    for mode, forwards in (("none", 1), ("full", 2)):
        cfg = from_dict({"activation_checkpointing": mode, "output_dir": str(tmp_path / mode), "n_synthetic": 16,
                         "progress": False, "plot": False})
        model = Trainer.build(cfg).policy.model
        model.train()
        batch = pack([Sequence([1, 2, 3], [4, 5], [], group=0)])
        with torch.no_grad():
            decoder_hidden_states(model, batch)  # the first call picks the forward mode, with forwards of its own
        calls = []
        model.get_decoder().layers[0].self_attn.register_forward_pre_hook(lambda *a: calls.append(1))
        decoder_hidden_states(model, batch).sum().backward()
        assert len(calls) == forwards, mode
