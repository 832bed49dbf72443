"""grouped_advantages against an idiomatic PyTorch composite and a plain copy.

    pytest benchmarks/test_bench_grouped_advantages.py --benchmark-group-by=param:n

Targets on an H100 (recorded in benchmarks/results/): at least 5x faster than the
composite at B = 10^6, and within 2x of a device-to-device copy of the same bytes at
B = 1.6 * 10^7. On the CPU only the small sizes run.
"""

import pytest
import torch
from conftest import run_timed

from pyvf.bench import composite_advantages
from pyvf.ops import grouped_advantages

G = 8
SIZES = [10**3, 10**4, 10**5, 10**6, 16 * 10**6]
CPU_MAX = 10**6


def copy(rewards, out):
    return out.copy_(rewards)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("estimator", ["rloo", "grpo"])
@pytest.mark.parametrize("impl", ["pyvf", "torch-composite", "copy"])
def test_grouped_advantages(benchmark, device, sync, impl, estimator, n):
    if device.type == "cpu" and n > CPU_MAX:
        pytest.skip(f"B={n} runs on a GPU only (CPU sizes stop at {CPU_MAX})")
    rewards = torch.rand(n, device=device)
    benchmark.group = f"grouped_advantages-{estimator}-n{n}"
    benchmark.extra_info.update(op="grouped_advantages", impl=impl, n=n, estimator=estimator, group_size=G)
    if impl == "pyvf":
        run_timed(benchmark, sync, grouped_advantages, rewards, G, estimator=estimator)
    elif impl == "torch-composite":
        run_timed(benchmark, sync, composite_advantages, rewards, G, estimator)
    else:
        run_timed(benchmark, sync, copy, rewards, torch.empty_like(rewards))
