"""Loads the compiled module pyvf._C and reports what it was built with."""

from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType

_BUILD_HINT = (
    "pyvf._C is not built. From the repository root run:\n"
    "    pip install --no-build-isolation -e .\n"
    "(see the README's Install section)"
)


@functools.lru_cache(maxsize=None)
def _load() -> ModuleType | None:
    try:
        return importlib.import_module("pyvf._C")
    except ImportError:
        return None


def native() -> ModuleType:
    """The compiled module, or an ImportError that says how to build it."""
    module = _load()
    if module is None:
        raise ImportError(_BUILD_HINT)
    return module


def build_info() -> dict:
    """The backends this installation can run.

    Keys: `native` (pyvf._C importable), `cpu`, `openmp`, `cuda`, `cuda_archs`,
    `torch` (the version _C was compiled against), `triton` (the importable
    Triton version, or None).
    """
    module = _load()
    info = dict(module.build_info()) if module is not None else {
        "cpu": False, "openmp": False, "cuda": False, "cuda_archs": "", "torch": None,
    }
    info["native"] = module is not None
    triton_spec = importlib.util.find_spec("triton")
    if triton_spec is None:
        info["triton"] = None
    else:
        import triton

        info["triton"] = triton.__version__
    return info


def flush_subnormals(on: bool = True) -> int:
    """Flush-to-zero and denormals-are-zero in the CPU threads torch computes on (the
    calling thread and its OpenMP team; x86 only). Training on the CPU turns it on: a
    gradient scaled by a reward of 1e-35 (VeriFree's probability of a long reference)
    makes the decoder's backward GEMMs produce subnormals, each a microcode assist on
    x86, 100x slower, for values below 1.2e-38 that no optimizer step can see. Returns
    the number of threads set (0 where the CPU has no such mode)."""
    return int(native().flush_subnormals(bool(on)))
