#!/usr/bin/env bash
# A regular (non-editable) install as a new user does it, into a fresh virtual
# environment, then `pyvf train` from outside the source tree:
#
#     bash .ci/install_check.sh [REPO]        # REPO defaults to this checkout
#
# The files git would commit (tracked, plus untracked ones not ignored) are copied to a
# temporary folder first, so nothing built or cached in REPO (build/, *.so, egg-info)
# can hide a file missing from the package. Fails on the first error.
set -euo pipefail

repo=$(cd "${1:-$(dirname "$0")/..}" && pwd)
python=${PYTHON:-python3}
# The virtual environment (about 2.5 GB) goes to memory when there is room: deleting its
# files from a disk took over 2 minutes on the CI machine, from /dev/shm a second.
base=${TMPDIR:-/tmp}
if [ -z "${TMPDIR:-}" ] && [ -w /dev/shm ] && [ "$(df -Pk /dev/shm | awk 'NR == 2 {print $4}')" -gt 6000000 ]; then
  base=/dev/shm
fi
tmp=$(mktemp -d "$base/pyvf-install-check.XXXXXX")
start=$SECONDS
say() { echo "install-check [$((SECONDS - start))s]: $*"; }
trap 'say "removing $tmp"; rm -rf "$tmp"; say "removed"' EXIT

say "copying the committable files of $repo"
mkdir "$tmp/src"
if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # --exclude-standard also drops untracked files .gitignore names; a deleted but
  # still tracked file is skipped (tar would fail on it).
  (cd "$repo" && git ls-files -z --cached --others --exclude-standard \
     | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
     | tar --null -T - -cf -) | tar -xf - -C "$tmp/src"
else
  cp -a "$repo/." "$tmp/src"
fi

say "fresh virtual environment ($("$python" --version))"
"$python" -m venv "$tmp/venv"
venv_python="$tmp/venv/bin/python"
# The build requirements, so that --no-build-isolation builds against this torch.
"$venv_python" -m pip install -q "torch==2.13.0" "cmake>=3.18" ninja setuptools wheel pybind11

say "pip install --no-build-isolation (regular, not editable)"
PYVF_BUILD_DIR="$tmp/cmake-build" "$venv_python" -m pip install -q --no-build-isolation "$tmp/src"

# Everything below runs from an empty folder: only the installed copy is importable.
mkdir "$tmp/run"
cd "$tmp/run"
say "checking the installed package"
"$venv_python" - "$tmp/src" <<'EOF'
import importlib
import pathlib
import sys

import pyvf

src = pathlib.Path(sys.argv[1]).resolve()
installed = pathlib.Path(pyvf.__file__).resolve().parent
if src in installed.parents:
    sys.exit(f"pyvf imported from the source tree ({installed}), not the installed copy")
info = pyvf.build_info()
if not info["native"]:
    sys.exit(f"pyvf._C is missing from the installed copy: build_info() = {info}")
# Every package of the source tree, imported from the installed copy.
expected = ["pyvf." + ".".join(p.parent.relative_to(src / "pyvf").parts) for p in (src / "pyvf").rglob("__init__.py")]
expected = [name.rstrip(".") for name in expected]
for name in sorted(n.rstrip(".") for n in expected):
    module = importlib.import_module(name)
    if src in pathlib.Path(module.__file__).resolve().parents:
        sys.exit(f"{name} imported from the source tree")
data = [installed / "assets" / "tokenizer" / "tokenizer.json", installed / "assets" / "model" / "config.json",
        installed / "assets" / "model" / "model.safetensors", installed / "kernels" / "triton" / "token_logprobs.py",
        installed / "data" / "rubrics" / "story.yaml"]
missing = [str(p) for p in data if not p.is_file()]
if missing:
    sys.exit(f"package data missing from the installed copy: {missing}")
from pyvf.assets import load_tokenizer

load_tokenizer()
print(f"installed at {installed}; {len(expected)} packages import; build_info {info}")
EOF

say "pyvf train --max-steps 1 from $tmp/run"
"$tmp/venv/bin/pyvf" train --max-steps 1 --output-dir "$tmp/run/out" --prompts-per-step 2 --group-size 2 \
  --max-new-tokens 8 --n-synthetic 16 --progress false --plot false
test -f "$tmp/run/out/metrics.jsonl" || { echo "install-check: no metrics.jsonl after pyvf train" >&2; ls -R "$tmp/run/out" >&2; exit 1; }
say "ok"
