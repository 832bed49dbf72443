"""`pyvf selfplay` (R-Zero): the phases run in order, each in its own directory, and an
interrupted run continues to the same result as an uninterrupted one."""

import json

import pytest
import torch

from pyvf.runtime import checkpoint
from pyvf.train.config import ConfigError
from pyvf.workflows import selfplay as selfplay_mod
from pyvf.workflows.selfplay import SelfPlayConfig, selfplay

TINY = dict(challenger_steps=2, solver_steps=2, questions=8, solver_samples=3, prompts_per_step=2,
            challenger_group_size=2, solver_group_size=2, max_new_tokens=40, eval_questions=0, progress=False,
            lr=1e-4, band_low=0.0, band_high=1.0)


def weights(path):
    return checkpoint.load_model_tensors(path)


def test_selfplay_resumes_exactly(tmp_path, monkeypatch):
    full = selfplay(SelfPlayConfig(output_dir=str(tmp_path / "full"), iterations=2, **TINY))
    assert [h["iteration"] for h in full["history"]] == [1, 2]
    for i in (1, 2):
        here = tmp_path / "full" / f"iter{i}"
        assert (here / "challenger" / "checkpoints" / "latest").read_text() == "step-000002"
        rows = [json.loads(line) for line in (here / "questions.jsonl").read_text().splitlines()]
        assert all(r["question"] and r["answer"] for r in rows)
        assert full["history"][i - 1]["questions"]["in_band"] == len(rows)
    assert full["history"][0]["questions"]["valid"] > 0  # the shipped model writes questions
    assert full["solver"].startswith(str(tmp_path / "full" / "iter2" / "solver"))

    # Interrupted after iteration 1's challenger phase, then continued (twice: one more iteration each).
    part = tmp_path / "part"
    real = selfplay_mod.write_questions

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(selfplay_mod, "write_questions", interrupted)
    with pytest.raises(KeyboardInterrupt):
        selfplay(SelfPlayConfig(output_dir=str(part), iterations=1, **TINY))
    assert json.loads((part / "selfplay.json").read_text())["phase"] == "challenger"
    monkeypatch.setattr(selfplay_mod, "write_questions", real)
    selfplay(SelfPlayConfig(output_dir=str(part), iterations=1, **TINY))
    resumed = selfplay(SelfPlayConfig(output_dir=str(part), iterations=2, **TINY))
    assert [h["questions"] for h in resumed["history"]] == [h["questions"] for h in full["history"]]
    for role in ("solver", "challenger"):
        a, b = weights(full[role]), weights(resumed[role])
        assert all(torch.equal(a[k], b[k]) for k in a), role

    # Other settings in the same directory are refused.
    with pytest.raises(ConfigError, match="questions 8 -> 13"):
        selfplay(SelfPlayConfig(output_dir=str(part), iterations=2, **{**TINY, "questions": 13}))


def test_config_errors():
    for bad, match in [({"iterations": 0}, "iterations"), ({"band_low": 0.9, "band_high": 0.1}, "band_low"),
                       ({"solver_objective": "nover"}, "solver_objective"), ({"challenger_group_size": 1}, "group")]:
        with pytest.raises(ConfigError, match=match):
            SelfPlayConfig(**bad).validate()
