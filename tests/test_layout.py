"""The repository root never shadows an installed package.

Whenever the root is on sys.path (``python -m pytest``, ``python -c``, a script or notebook
started there), a root folder with an ``__init__.py`` or a root ``.py`` file is importable under
its own name, ahead of site-packages. A root ``kernels/__init__.py`` once broke every
transformers model here: transformers (>= 5.25) imports Hugging Face's ``kernels``.
"""

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Builds a transformers model, the call that imports Hugging Face's `kernels`, and prints
# where `kernels` came from.
BUILD_MODEL = """
import importlib.util, transformers
from transformers import Qwen3Config, Qwen3ForCausalLM
config = Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=8)
Qwen3ForCausalLM(config)
spec = importlib.util.find_spec("kernels")
print(spec.origin if spec is not None else "absent")
"""


def _importable_root_names() -> dict[str, Path]:
    """Names a process started in the root imports from the root rather than site-packages."""
    names = {}
    for entry in ROOT.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and (entry / "__init__.py").is_file():
            names[entry.name] = entry
        elif entry.is_file() and entry.suffix == ".py":
            names[entry.stem] = entry
    return names


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_only_pyvf_is_a_package_at_the_root():
    packages = sorted(name for name, path in _importable_root_names().items() if path.is_dir())
    assert packages == ["pyvf"], f"regular packages at the repository root: {packages}"


def test_no_root_name_is_another_distributions_module():
    provided = importlib.metadata.packages_distributions()  # import name -> distributions
    clashes = {name: provided[name] for name in _importable_root_names()
               if name in provided and provided[name] != ["pyvf"]}
    assert not clashes, f"root entries that shadow installed distributions: {clashes}"


def test_kernels_in_this_process_is_not_the_repository():
    # `python -m pytest` from the root (as CI runs it) puts the root first on sys.path.
    spec = importlib.util.find_spec("kernels")
    if spec is None:
        return
    origins = [spec.origin] if spec.origin else []
    origins += list(spec.submodule_search_locations or [])
    assert all(ROOT not in Path(o).resolve().parents for o in origins if o), (
        f"`import kernels` resolves into the repository: {origins}")


@pytest.mark.parametrize("how", ["python -c", "script on stdin"])
def test_transformers_model_builds_from_the_root(how):
    command = [sys.executable, "-c", BUILD_MODEL] if how == "python -c" else [sys.executable, "-"]
    result = subprocess.run(command, cwd=ROOT, input=None if how == "python -c" else BUILD_MODEL,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    origin = result.stdout.strip().splitlines()[-1]
    if _hf_kernels_installed():
        assert "site-packages" in origin and ROOT not in Path(origin).resolve().parents, origin
    else:
        # A root folder without __init__.py is at most a namespace portion (no origin file).
        assert origin in ("absent", "None") or ROOT not in Path(origin).resolve().parents, origin
