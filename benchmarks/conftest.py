import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--bench-device", default="cuda" if torch.cuda.is_available() else "cpu",
                     help="device the benchmarks run on (default: cuda when available)")


@pytest.fixture(scope="session")
def device(request):
    return torch.device(request.config.getoption("--bench-device"))


@pytest.fixture(scope="session")
def sync(device):
    """Makes a timed call wait for its kernels, so GPU timings measure the work."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def run_timed(benchmark, sync, fn, *args, **kwargs):
    def call():
        out = fn(*args, **kwargs)
        sync()
        return out

    call()  # warm-up: first-call allocations, lazy loading, autotuning
    return benchmark(call)


def time_lm_head(benchmark, sync, device, call, *, op, impl, pass_, n, h, v, dtype):
    """Times `call` (one pass of an lm_head op) and records what `pyvf bench` records:
    TFLOP/s counted as logprob_flops, peak memory; a peer out of memory is a skip."""
    from pyvf.bench import logprob_flops, peak_memory_bytes

    benchmark.group = f"{op}-{pass_}-n{n}-h{h}-v{v}"
    try:
        run_timed(benchmark, sync, call)
    except torch.OutOfMemoryError:
        pytest.skip(f"{impl} ran out of memory")
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(
        op=op, impl=impl, n=n, h=h, v=v, dtype=str(dtype).replace("torch.", ""),
        tflops=logprob_flops(n, h, v, pass_) / seconds / 1e12,
        peak_mem_bytes=peak_memory_bytes(call, device), **{"pass": pass_},
    )
