import sys

import pytest

from pyvf.bench import memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU memory measure reads Linux /proc")
def test_the_separate_reward_pass_keeps_less_memory_than_a_fused_group():
    """One VeriFree step on a group of 8 completions of 512 tokens: with the group in one
    micro-batch the step holds all of its activations at once; with the separate reward
    pass, one completion's."""
    case = [64, 2, 2, 8, 512, "float32", "cpu"]  # hidden, layers, heads, completions, tokens
    fused, = memory.measure_in_fresh_process("pyvf.bench.long_group", "fused", [case])
    separate, = memory.measure_in_fresh_process("pyvf.bench.long_group", "separate", [case])
    assert isinstance(fused, int) and isinstance(separate, int), (fused, separate)
    assert separate < fused / 3, (separate, fused)
