import json

from pyvf.runtime.metrics import MetricsLog


def test_resume_keeps_each_step_once_and_drops_a_torn_line(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    for step in range(1, 5):
        log.write({"step": step, "loss": float(step)})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # a kill in the middle of a write
    resumed = MetricsLog(tmp_path, resume_step=2, tensorboard=False)
    assert [r["step"] for r in resumed.records()] == [1, 2]
    for step in (3, 4):
        resumed.write({"step": step, "loss": 10.0 * step})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert json.loads(lines[-1])["loss"] == 40.0


def test_a_fresh_run_starts_an_empty_log(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    assert MetricsLog(tmp_path, tensorboard=False).records() == []
