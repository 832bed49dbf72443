"""Peak extra memory of one call on the CPU, where PyTorch's allocator keeps no count.

The measure is the process's resident high-water mark (Linux: VmHWM in /proc/self/status)
after one call, minus its resident size (VmRSS) just before, with the high-water mark
reset to the current size (`5` written to /proc/self/clear_refs) in between. Two things
would make that inexact, and both are removed by running the measurement in a fresh
process started by `measure_in_fresh_process`:

- glibc keeps freed memory resident for reuse: freed heap blocks stay mapped, and after
  the first large free its mmap threshold grows (up to 32 MiB), so a later call could
  reuse pages that are already resident and show less than it allocates. The fresh
  process runs with a fixed MALLOC_MMAP_THRESHOLD_ (64 KiB), which also turns the
  dynamic threshold off: every buffer of 64 KiB or more is its own mapping, returned to
  the system when freed, so what one case frees does not hide the next case's buffers.
- Lazy set-up (thread pools, MKL buffers, torch.compile) would be charged to the first
  call: each case runs twice before it is measured.

What it counts is resident memory: pages a call wrote. A buffer allocated and never
touched costs no memory on the CPU and shows nothing. Checked by tests/test_bench.py
(and `python -m pyvf.bench.memory --check`): a written [4096, 32000] fp32 tensor (500
MiB) measures within 2 MiB of N * V * 4 bytes, also right after a larger tensor was
freed, and a call that allocates nothing measures under 2 MiB.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from typing import Callable

# Fixed (hence non-dynamic) glibc mmap threshold of the measuring process; see above.
MMAP_THRESHOLD = 64 * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def supported() -> bool:
    """Whether this process can reset and read its resident high-water mark (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False


def rss_peak_bytes(fn: Callable[[], object]) -> int:
    """Resident memory that one fn() added at its peak over what was resident before.
    Exact only in a process set up as `measure_in_fresh_process` sets it up."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS
    base = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    return max(0, peak - base) * 1024


def measure_cases(module: str, impl: str, cases: list[list], warmup: int = 2) -> list:
    """In this process: for each case (the arguments of `module.memory_call(impl, *case)`,
    which returns (call, tensors whose .grad to clear)), warms the call up, then measures
    one call. A case that fails gives its error as a string."""
    import importlib

    suite = importlib.import_module(module)
    out = []
    for case in cases:
        try:
            call, tensors = suite.memory_call(impl, *case)
            for _ in range(warmup):
                call()
            for t in tensors:
                t.grad = None
            out.append(rss_peak_bytes(call))
            del call, tensors
        except Exception as e:  # noqa: BLE001 - reported in the table
            out.append(f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
        gc.collect()
    return out


def measure_in_fresh_process(module: str, impl: str, cases: list[list], timeout: float = 900) -> list:
    """measure_cases in a new Python process set up for an exact measure (module
    docstring). Returns one entry per case: bytes, or a status string."""
    if not sys.platform.startswith("linux"):
        return ["no measure: needs Linux /proc"] * len(cases)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    spec = json.dumps({"module": module, "impl": impl, "cases": cases})
    try:
        proc = subprocess.run([sys.executable, "-m", "pyvf.bench.memory", spec], env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [f"no measure: timed out after {timeout:.0f} s"] * len(cases)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]
        return [f"no measure: {err}"] * len(cases)
    return json.loads(lines[-1])


def fill_cpu_memory(records: list, module: str, case_of: Callable[[object], list]) -> None:
    """Sets peak_mem_bytes of every timed Record, one fresh process per implementation
    measuring all of its cases (`case_of(record)`: the arguments of
    `module.memory_call(impl, *case)`); a failed measure leaves the column empty and
    says why in the status."""
    by_impl: dict[str, list] = {}
    for r in records:
        if r.ms is not None:
            by_impl.setdefault(r.impl, []).append(r)
    for impl, recs in by_impl.items():
        print(f"bench: {recs[0].op} peak memory of {impl} (fresh process)", flush=True)
        for r, peak in zip(recs, measure_in_fresh_process(module, impl, [case_of(r) for r in recs])):
            if isinstance(peak, int):
                r.peak_mem_bytes = peak
            else:
                r.status = f"ok; memory {peak}"


# A case for the check: a written [n, v] fp32 tensor after freeing a larger one.
def memory_call(impl: str, n: int, v: int):
    import torch

    if impl == "nothing":
        return (lambda: None), []
    torch.ones(2 * n, v).sum()  # a larger buffer, freed before the measured call

    def call():
        return torch.ones(n, v).sum()

    return call, []


def check(n: int = 4096, v: int = 32000) -> dict:
    """Measures the calibration cases in a fresh process: {'expected', 'ones', 'nothing'}."""
    ones, = measure_in_fresh_process(__name__, "ones", [[n, v]])
    nothing, = measure_in_fresh_process(__name__, "nothing", [[n, v]])
    return {"expected": n * v * 4, "ones": ones, "nothing": nothing}


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        print(json.dumps(check()))
    else:
        spec = json.loads(sys.argv[1])
        print(json.dumps(measure_cases(spec["module"], spec["impl"], spec["cases"])))
