"""pyvf.bench's plumbing on the CPU: the suites it names, the peak-memory measure (exact to
a few MiB, checked against tensors of known size) and the interleaved timing's handling
of a failing implementation. No timing asserts: speed targets live in benchmarks/."""

import sys

import pytest
import torch

import pyvf.bench as bench
from pyvf.bench import memory

MiB = 2**20
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux") or not memory.supported(),
                                reason="the resident high-water mark is read from Linux /proc")


def test_default_suites_include_policy_loss_and_every_suite_states_its_shapes():
    assert "policy_loss" in bench.DEFAULT_SUITES
    assert set(bench.DEFAULT_SUITES) <= set(bench.SUITES)
    for name in bench.SUITES:
        about = bench.load_suite(name).ABOUT
        assert about.startswith(name.split("_advantages")[0]) and "FLOP" in about, (name, about)


@linux_only
def test_memory_measure_is_exact_for_a_tensor_of_known_size():
    n, v = 1024, 32000
    got = memory.check(n, v)
    # A freed larger tensor before the measured one does not hide it (module docstring).
    assert abs(got["ones"] - n * v * 4) < 2 * MiB, got
    assert got["nothing"] < 2 * MiB, got


@linux_only
def test_policy_loss_peak_memory_stays_below_the_logits():
    n, h, v = 1024, 128, 32000
    case = [[n, h, v, "float32", "cpu"]]
    fused, = memory.measure_in_fresh_process("pyvf.bench.policy_loss", "pyvf", case)
    full, = memory.measure_in_fresh_process("pyvf.bench.policy_loss", "full-logits", case)
    logits = n * v * 4
    # pyvf: one chunk buffer (64 MiB) and the weight's gradient; the full logits: at least
    # the [N, V] logits themselves and their gradient.
    assert isinstance(fused, int) and isinstance(full, int), (fused, full)
    assert fused < logits < full - v * h * 4, (fused, logits, full)


def test_measure_interleaved_reports_a_failing_implementation():
    ok = bench.Record("op", "ok", "fwd", 1, 1, 1, "float32", None, None, None)
    bad = bench.Record("op", "bad", "fwd", 1, 1, 1, "float32", None, None, None)

    def fail():
        raise RuntimeError("boom")

    bench.measure_interleaved([(ok, lambda: None), (bad, fail)], torch.device("cpu"), flops=1.0, repeats=3)
    assert ok.status == "ok" and ok.ms is not None and ok.tflops is not None
    assert bad.ms is None and bad.status.startswith("failed: RuntimeError: boom")
