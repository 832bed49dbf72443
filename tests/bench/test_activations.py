import sys

import pytest

from pyvf.bench import memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU memory measure reads Linux /proc")
def test_activation_checkpointing_keeps_less_memory():
    case = [128, 8, 2, 1000, 2048, "float32", "cpu"]  # hidden, layers, heads, vocabulary, tokens
    none, = memory.measure_in_fresh_process("pyvf.bench.activations", "none", [case])
    full, = memory.measure_in_fresh_process("pyvf.bench.activations", "full", [case])
    assert isinstance(none, int) and isinstance(full, int), (none, full)
    assert full < none / 2, (full, none)
