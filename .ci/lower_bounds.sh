#!/usr/bin/env bash
# CI for the lower bounds in pyproject.toml: the pure-Python runtime dependencies at their
# oldest allowed versions, in a virtual environment layered over the main one (it sees
# the main job's torch and the editable pyvf, and shadows the rest), then the tests that
# exercise them. torch and triton keep the main job's versions: their lower bounds are the
# GPU machine's (see README, "Tested versions").
#
#     bash .ci/lower_bounds.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
start=$(date +%s)

# The oldest versions pyproject.toml allows, read from it, so the two cannot drift apart.
mapfile -t pins < <("$python" - <<'EOF'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
for dep in deps:
    name = re.match(r"[A-Za-z0-9_.-]+", dep).group(0)
    low = re.search(r">=\s*([0-9][^,;\s]*)", dep)
    if name in ("torch", "triton", "pybind11"):   # the main job's (see above); pybind11 builds only
        continue
    if not low:
        raise SystemExit(f"lower_bounds: {dep!r} in pyproject.toml has no lower bound")
    print(f"{name}=={low.group(1)}")
EOF
)
venv=$(mktemp -d "${TMPDIR:-/tmp}/pyvf-lower-bounds.XXXXXX")
trap 'rm -rf "$venv"' EXIT
"$python" -m venv --system-site-packages "$venv"
echo "ci-lower-bounds: installing ${pins[*]}"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "${pins[@]}"
"$venv/bin/python" - "${pins[@]}" <<'EOF'
import importlib.metadata, sys
from packaging.version import Version
for pin in sys.argv[1:]:
    name, version = pin.split("==")
    got = importlib.metadata.version(name)
    if Version(got) != Version(version):
        sys.exit(f"lower_bounds: {name} is {got} in the environment, not the lower bound {version}")
print("ci-lower-bounds: versions", ", ".join(sys.argv[1:]))
EOF

log=$(mktemp)
set +e
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_layout.py tests/runtime tests/test_chat.py \
  tests/data tests/train/test_config.py tests/workflows/test_evaluate.py \
  "tests/train/test_trainer.py::test_train_with_a_model_directory" \
  "tests/train/test_mixed_precision.py::test_bf16_resumes_bit_exactly_and_exports" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
echo "ci-lower-bounds: $(($(date +%s) - start)) s"
if [ "$status" -ne 0 ]; then
  echo "ci-lower-bounds: tests failed at the lower bounds (exit $status)" >&2
  exit "$status"
fi
grep -qE '[0-9]+ passed' "$log" || { echo "ci-lower-bounds: no test ran" >&2; exit 1; }
echo "ci-lower-bounds: ok"
