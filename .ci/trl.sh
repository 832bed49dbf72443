#!/usr/bin/env bash
# CI for pyvf.integrations (TRL and verl), in a virtual environment of its own so that the
# main environment keeps its torch and transformers:
#   1. build (or reuse, when its pins match) the venv: torch, the pinned TRL, and verl's
#      fused-head modules (verl==0.9.1 without its Ray-cluster extras);
#   2. install pyvf into it with the `trl` extra (pip install -e ".[trl]");
#   3. run tests/integrations there, failing on any failure OR any skipped test;
#   4. run examples/trl_verifree.py for a few steps and check it wrote a reward curve.
# Prints the time of each phase. PYVF_TRL_VENV overrides the venv location.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
phase_start=$start
phase() {
  local now
  now=$(date +%s)
  echo "ci-trl: $1 ($((now - phase_start)) s)"
  phase_start=$now
}

TORCH_PIN="torch==2.13.0"
TRL_PIN="trl==1.16.0"
TRANSFORMERS_PIN="transformers==5.24.0"
VERL_PIN="verl==0.9.1"
# verl's package imports these at `import verl`; the rest of its requirements (ray[default], wandb,
# vllm, and transformers<5.11) serve its Ray trainer, which these tests do not start.
VERL_IMPORT_DEPS=(ray "tensordict==0.10.0" hydra-core codetiming dill pylatexenc torchdata)
BUILD_DEPS=("cmake>=3.18" ninja setuptools wheel pybind11 pytest peft)

VENV="${PYVF_TRL_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/pyvf-ci/venv-trl}"
stamp="$(python -V 2>&1) | $TORCH_PIN $TRL_PIN $TRANSFORMERS_PIN $VERL_PIN ${VERL_IMPORT_DEPS[*]} ${BUILD_DEPS[*]}"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.pyvf-ci-stamp" 2>/dev/null)" = "$stamp" ]; then
  echo "ci-trl: reusing $VENV"
else
  echo "ci-trl: building $VENV"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  python -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH_PIN"
  "$VENV/bin/pip" install -q "$TRL_PIN" "$TRANSFORMERS_PIN" "${BUILD_DEPS[@]}"
  "$VENV/bin/pip" install -q --no-deps "$VERL_PIN"
  "$VENV/bin/pip" install -q "${VERL_IMPORT_DEPS[@]}" "$TORCH_PIN" "$TRANSFORMERS_PIN"
  echo "$stamp" > "$VENV/.pyvf-ci-stamp"
fi
py="$VENV/bin/python"
phase "venv ready"

# pyvf into the venv. The native module that .ci/run's main job built in place (same Python,
# same torch) is reused through a .pth entry, and pip checks that the `trl` extra resolves
# to the pinned packages without building; without a built module (or with
# PYVF_TRL_FULL_INSTALL=1) this is a full `pip install -e ".[trl]"`, which compiles pyvf._C
# (about 5 minutes on 2 cores).
"$VENV/bin/pip" uninstall -q -y pyvf >/dev/null 2>&1 || true
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -f "$site/pyvf-checkout.pth"
if compgen -G "pyvf/_C*.so" >/dev/null && [ "${PYVF_TRL_FULL_INSTALL:-0}" != "1" ]; then
  echo "$PWD" > "$site/pyvf-checkout.pth"
  "$VENV/bin/pip" install -q --dry-run --no-build-isolation -e ".[trl]" --report "$VENV/extra-report.json"
  "$py" - "$VENV/extra-report.json" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
items = {i["metadata"]["name"].lower(): i["metadata"] for i in report["install"]}
if "trl" not in (items.get("pyvf", {}).get("provides_extra") or []):
    sys.exit("ci-trl: pyproject.toml has no `trl` extra")
changed = [f"{n}=={items[n]['version']}" for n in ("trl", "torch", "transformers") if n in items]
if changed:
    sys.exit(f"ci-trl: pip install -e '.[trl]' would replace the venv's pinned packages with {changed}")
EOF
else
  PYVF_BUILD_DIR="$VENV/pyvf-build" MAX_JOBS="${MAX_JOBS:-2}" \
    "$VENV/bin/pip" install -q --no-build-isolation -e ".[trl]"
fi
"$py" - "$TORCH_PIN" "$TRL_PIN" "$TRANSFORMERS_PIN" "$PWD" <<'EOF'
import sys
import torch, transformers, trl
import pyvf, pyvf.integrations.trl, pyvf.integrations.verl
want = {p.split("==")[0]: p.split("==")[1] for p in sys.argv[1:-1]}
have = {"torch": torch.__version__.split("+")[0], "trl": trl.__version__, "transformers": transformers.__version__}
bad = {k: (have[k], v) for k, v in want.items() if have[k] != v}
if bad:
    sys.exit(f"ci-trl: version mismatch in the venv (have, want): {bad}")
info = pyvf.build_info()
if not info["native"] or info["torch"].split("+")[0] != have["torch"]:
    sys.exit(f"ci-trl: pyvf._C is missing or built for another torch: {info}")
if not pyvf.__file__.startswith(sys.argv[-1]):
    sys.exit(f"ci-trl: the venv imports pyvf from {pyvf.__file__}, not from this checkout")
print("ci-trl: venv has", have)
EOF
phase "pyvf installed"

log=$(mktemp)
set +e
# --confcutdir keeps tests/ off sys.path: folders there must not shadow installed packages.
"$py" -m pytest -q -rs -p no:cacheprovider --confcutdir=tests/integrations tests/integrations 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
  echo "ci-trl: integration tests failed (exit $status)" >&2
  exit 1
fi
if grep -qE '[0-9]+ skipped' "$log" || ! grep -qE '[0-9]+ passed' "$log"; then
  echo "ci-trl: every integration test must run in the TRL venv; some were skipped or none ran" >&2
  exit 1
fi
phase "integration tests"

out=$(mktemp -d)
"$py" examples/trl_verifree.py --max-steps 2 --num-prompts 16 --prompts-per-step 2 --num-generations 2 \
  --max-completion-length 40 --output-dir "$out" 2>&1 | grep -E '^(step|reward curve)'
"$py" - "$out/reward_curve.csv" <<'EOF'
import csv, math, sys
rows = list(csv.DictReader(open(sys.argv[1])))
rewards = [float(r["reward"]) for r in rows]
if len(rewards) != 2 or not all(math.isfinite(r) and 0.0 <= r <= 1.0 for r in rewards):
    sys.exit(f"ci-trl: the example's reward curve is wrong: {rows}")
print(f"ci-trl: example logged a reward curve of {len(rewards)} steps")
EOF
rm -rf "$out"
phase "example"
echo "ci-trl: ok in $(( $(date +%s) - start )) s"
