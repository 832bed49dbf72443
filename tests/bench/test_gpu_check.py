"""benchmarks/gpu_check.sh's parts that its CPU dry run (a CI step of .ci/run) never
reaches: the wheels it must refuse to carry or install, a stage killed whole at its limit,
the deadline that skips stages, the 8-file check, and stage files that a kill cuts short.
No network, no GPU; a few seconds."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"
FETCH_WHEELS = ROOT / "benchmarks" / "fetch_wheels.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or not sys.platform.startswith("linux"),
                                reason="the GPU check's scripts are bash on Linux")

REFUSED = [
    "torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl",
    "Torch-2.5.0-cp312-cp312-manylinux1_x86_64.whl",
    "triton-3.6.0-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
    "pytorch_triton-3.1.0-cp312-cp312-linux_x86_64.whl",
    "torchvision-0.26.0-cp312-cp312-manylinux_2_28_x86_64.whl",
    "nvidia_cublas_cu12-12.4.5.8-py3-none-manylinux2014_x86_64.whl",
    "nvidia_cutlass_dsl-4.2.0-cp312-cp312-manylinux_2_28_x86_64.whl",
]
# Names that start like a refused one and must still travel.
KEPT = [
    "liger_kernel-0.8.5-py3-none-any.whl",
    "cut_cross_entropy-25.1.1-py3-none-any.whl",
    "torchmetrics-1.9.0-py3-none-any.whl",
    "tritonclient-2.50.0-py3-none-any.whl",
]


def bash(script: str, env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def fake_wheels(folder: Path, names) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).touch()
    return folder


def test_fetch_wheels_filter_deletes_torch_triton_and_nvidia_wheels_only(tmp_path):
    folder = fake_wheels(tmp_path / "whl", REFUSED + KEPT)
    (folder / "torch-notes.txt").touch()  # not a wheel: left alone
    r = bash(f'bash "{FETCH_WHEELS}" --filter-only "{folder}"')
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(folder)) == sorted(KEPT + ["torch-notes.txt"])
    for name in REFUSED:
        assert f"deleted {name}: " in r.stderr, (name, r.stderr)
    assert "shadow" in r.stderr


def test_fetch_wheels_filter_only_names_a_missing_folder(tmp_path):
    r = bash(f'bash "{FETCH_WHEELS}" --filter-only "{tmp_path / "nowhere"}"')
    assert r.returncode == 2 and "no folder" in r.stderr and "nowhere" in r.stderr


def test_gpu_check_installs_no_refused_wheel_and_no_two_versions(tmp_path):
    folder = fake_wheels(tmp_path / "whl", REFUSED + KEPT)
    script = f'source "{GPU_CHECK}"; LOG="{tmp_path}/log"; peer_wheels "{folder}"; printf "%s\\n" "${{PEER_WHEELS[@]}}"'
    r = bash(script)
    assert r.returncode == 0, r.stderr
    chosen = [Path(line).name for line in r.stdout.splitlines() if line.endswith(".whl")]
    assert sorted(chosen) == sorted(KEPT)
    log = (tmp_path / "log").read_text()
    for name in REFUSED:
        assert f"not installing {name}: " in log, (name, log)

    # Two versions of one package stop a pip install: none is installed, and the log says which.
    (folder / "liger_kernel-0.8.4-py3-none-any.whl").touch()
    r = bash(script)
    assert r.returncode == 0, r.stderr
    assert not [line for line in r.stdout.splitlines() if line.endswith(".whl")]
    assert "two versions of liger_kernel" in (tmp_path / "log").read_text()


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a slow init to reap it counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_a_stage_is_killed_whole_at_its_limit_and_its_leftovers_when_it_ends(tmp_path):
    # A stage that ignores SIGTERM, with a child that ignores it too (as a pytest-xdist or
    # inductor worker may): both must be gone when run_limited returns.
    stuck = f"trap '' TERM; (trap '' TERM; exec sleep 300) & echo $! > {tmp_path}/child1; sleep 300"
    # A stage that ends (exit 3) and leaves a worker running.
    leaves = f"(trap '' TERM; exec sleep 300) & echo $! > {tmp_path}/child2; exit 3"
    script = (f'source "{GPU_CHECK}"; LOG="{tmp_path}/log"; PY="{sys.executable}"; GRACE=1; '
              f'run_limited 1 "{tmp_path}/out" bash -c "$1"; echo "first $RUN_RC $RUN_TIMED_OUT"; '
              f'run_limited 30 "{tmp_path}/out" bash -c "$2"; echo "second $RUN_RC $RUN_TIMED_OUT"')
    t0 = time.monotonic()
    r = subprocess.run(["bash", "-c", script, "test", stuck, leaves], capture_output=True, text=True, timeout=60,
                       cwd=ROOT)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert "first 124 1" in r.stdout and "second 3 0" in r.stdout, r.stdout
    children = [int((tmp_path / f"child{i}").read_text()) for i in (1, 2)]
    assert not any(_alive(pid) for pid in children), children
    # The limit (1 s), SIGTERM ignored, SIGKILL a grace (1 s) later: not the 300 s sleep.
    assert elapsed < 20, elapsed


def test_deadline_skips_a_stage_and_the_dry_run_then_fails_with_the_summary_logged(tmp_path):
    out = Path(os.path.realpath(tmp_path)) / "out"
    env = {"PYVF_GPU_TOTAL": "0", "PYVF_GPU_STAGES": "d", "PYVF_WHEELS": str(tmp_path / "no-wheels"),
           "PYTHON": sys.executable}
    r = bash(f'bash "{GPU_CHECK}" "{out}" --dry-run', env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    stage = json.loads((out / "d_advantages.json").read_text())
    assert stage["status"] == "skipped" and "PYVF_GPU_TOTAL" in stage["notes"][0]
    assert "stages not ok: d_advantages skipped" in r.stdout
    log = (out / "gpu_check.log").read_text()
    # The log is complete: the summary table and the final file check, written last.
    assert "| d. grouped_advantages | skipped |" in log
    assert log.rstrip().splitlines()[-1].startswith(f"gpu_check: {out} holds 4 files")
    assert not list(out.rglob("*.tmp"))


def test_out_check_fails_on_a_ninth_file_or_a_temporary_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for i in range(8):
        (out / f"f{i}.json").touch()
    script = f'source "{GPU_CHECK}"; OUT="{out}"; LOG="{tmp_path}/log"; check_out'
    assert bash(script).returncode == 0
    (out / "f8.json").touch()
    r = bash(script)
    assert r.returncode == 1 and "holds 9 files, more than the 8" in r.stdout
    (out / "f8.json").unlink()
    (out / "f0.json").rename(out / "c_lm_head.json.tmp")
    r = bash(script)
    assert r.returncode == 1 and "temporary files left" in r.stdout and "c_lm_head.json.tmp" in r.stdout


def _gpu_stages():
    spec = importlib.util.spec_from_file_location("gpu_stages", ROOT / "benchmarks" / "gpu_stages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stage_file_keeps_no_temporary_in_out_and_mark_restores_a_copy_cut_short(tmp_path, monkeypatch):
    stages = _gpu_stages()
    out, kept = tmp_path / "out", tmp_path / "kept"
    out.mkdir()
    monkeypatch.setenv("PYVF_GPU_TMPDIR", str(kept))
    path = out / "c_lm_head.json"
    stage = stages.StageFile(str(path), "c_lm_head")
    stage.add("records", {"impl": "pyvf", "ms": 1.0})
    assert os.listdir(out) == ["c_lm_head.json"]
    assert not list(kept.glob("*.tmp"))

    # A kill while the file is copied into OUT: half a file there, nothing else.
    def cut_short(src, dst):
        Path(dst).write_text(Path(src).read_text()[:20])
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(stages.shutil, "copyfile", cut_short)
        with pytest.raises(KeyboardInterrupt):
            stage.add("records", {"impl": "full-logits", "ms": 2.0})
    assert os.listdir(out) == ["c_lm_head.json"]
    with pytest.raises(ValueError):
        json.loads(path.read_text())

    assert stages.main(["mark", str(path), "--status", "timeout", "--rc", "124", "--seconds", "7"]) == 0
    data = json.loads(path.read_text())
    assert data["status"] == "timeout" and data["exit_code"] == 124
    assert [r["impl"] for r in data["records"]] == ["pyvf", "full-logits"]
    assert os.listdir(out) == ["c_lm_head.json"]
