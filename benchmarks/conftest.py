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
