#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the peers benchmarks/gpu_check.sh measures pyvf against,
# as wheels for the GPU machine (CPython 3.12, x86-64, no network there), which has
# torch 2.11 and Triton 3.6 but not these. Run it where pip reaches PyPI, then carry the
# folder with the device call (carry: [".whl"]); gpu_check.sh installs what it finds.
#
#   bash benchmarks/fetch_wheels.sh [DIR]              # download into DIR (default .whl), then filter it
#   bash benchmarks/fetch_wheels.sh --filter-only DIR  # only the filter, on wheels already in DIR
#
# The filter deletes torch, torchvision, torchaudio, triton, pytorch-triton and nvidia-*
# wheels, saying so: gpu_check.sh puts the carried wheels ahead of the machine's packages
# on PYTHONPATH, so a carried torch or Triton (a CPU build, another CUDA, a Triton that
# does not match torch) or CUDA library would shadow the GPU machine's own CUDA torch.
# gpu_check.sh refuses the same wheels through wheel_refusal below (it sources this file).

# The peers, pinned: a new version changes the numbers compared.
PEERS=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1)
# Their pure-Python requirements that the GPU machine lacks, pinned likewise. None today:
# liger-kernel 0.8.5 and cut-cross-entropy 25.1.1 require only torch and triton (their
# Requires-Dist, extras aside), and import beyond those only packaging and transformers,
# all on the machine (as its package list shows). QuACK
# (quack-kernels) is left out: it needs nvidia-cutlass-dsl, an 88 MiB wheel, over what a
# call carries, and refused here anyway.
DEPS=()
# pip matches manylinux tags exactly: the ones a wheel for that machine may carry.
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)
# What a device call carries in all, the working tree included.
CARRY_LIMIT_MIB=64
# Distribution names (normalized as wheel_name prints them) never to carry.
REFUSED_RE='^(torch|torchvision|torchaudio|triton|pytorch_triton.*|nvidia_.*)$'

# wheel_name FILE: the distribution's name, normalized (PEP 503 with '_': a wheel's file
# name already spells '-' as '_').
wheel_name() {
  local base=${1##*/}
  local name=${base%%-*}
  name=${name,,}
  printf '%s\n' "${name//./_}"
}

# wheel_refusal FILE: why gpu_check.sh must not install this wheel; prints nothing when
# it may.
wheel_refusal() {
  local name
  name=$(wheel_name "$1")
  if [[ "$name" =~ $REFUSED_RE ]]; then
    echo "${1##*/}: $name would shadow the GPU machine's own CUDA build of torch, Triton and the CUDA libraries"
  fi
}

# filter_wheels DIR: deletes the refused wheels of DIR, naming each on stderr; 0 always.
filter_wheels() {
  local f reason
  for f in "$1"/*.whl; do
    [ -e "$f" ] || continue
    reason=$(wheel_refusal "$f")
    if [ -n "$reason" ]; then
      rm -f -- "$f"
      echo "fetch_wheels: deleted $reason" >&2
    fi
  done
}

# check_wheels DIR: names two versions of one package (pip would refuse to install
# either) and requirements that no wheel in DIR provides, which must then be on the GPU
# machine. 1 when there are two versions.
check_wheels() {
  python3 - "$1" "$REFUSED_RE" <<'EOF'
import re, sys, zipfile
from pathlib import Path

def norm(name):
    return re.sub(r"[-_.]+", "_", name).lower()

REFUSED = re.compile(sys.argv[2])  # never carried: on the GPU machine
wheels = sorted(Path(sys.argv[1]).glob("*.whl"))
names = {}
for w in wheels:
    names.setdefault(norm(w.name.split("-")[0]), []).append(w.name)
status = 0
for name, files in names.items():
    if len(files) > 1:
        print(f"fetch_wheels: two versions of {name} in {sys.argv[1]}: {', '.join(files)}; "
              "pip would stop the whole install: delete one", file=sys.stderr)
        status = 1
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
        lines = z.read(meta).decode(errors="replace").splitlines() if meta else []
    for line in lines:
        if not line.startswith("Requires-Dist:") or "extra ==" in line:
            continue
        req = norm(re.match(r"[A-Za-z0-9._-]+", line.split(":", 1)[1].strip()).group(0))
        if req not in names and not REFUSED.match(req):
            print(f"fetch_wheels: {w.name} requires {req}, which no wheel here provides: check that the GPU "
                  "machine has it, else add it to DEPS in benchmarks/fetch_wheels.sh")
sys.exit(status)
EOF
}

main() {
  set -uo pipefail
  if [ "${1:-}" = "--filter-only" ]; then
    local dir=${2:?usage: bash benchmarks/fetch_wheels.sh --filter-only DIR}
    [ -d "$dir" ] || { echo "fetch_wheels: no folder $dir" >&2; return 2; }
    filter_wheels "$dir"
    return 0
  fi
  case "${1:-}" in -*)
    echo "fetch_wheels: unknown option $1; usage: bash benchmarks/fetch_wheels.sh [DIR] | --filter-only DIR" >&2
    return 2 ;;
  esac
  local root p
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || return 1
  local dir=${1:-$root/.whl}
  local platforms=()
  for p in "${PLATFORMS[@]}"; do platforms+=(--platform "$p"); done
  mkdir -p "$dir" || return 1
  # --no-deps: resolving the requirements would fetch torch and the nvidia-* wheels (GBs);
  # the ones the machine lacks are named in DEPS instead.
  if ! python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${platforms[@]}" -d "$dir" "${PEERS[@]}" "${DEPS[@]}"; then
    echo "fetch_wheels: pip download failed (no network, or no wheel of ${PEERS[*]} ${DEPS[*]}" \
      "for CPython 3.12 on x86-64)" >&2
    return 1
  fi
  filter_wheels "$dir"
  check_wheels "$dir" || return 1
  local mib
  mib=$(du -sm "$dir" | cut -f1)
  echo "fetch_wheels: $dir holds $(ls "$dir"/*.whl 2>/dev/null | wc -l) wheels, ${mib} MiB:" \
    "carry it with the device call ($CARRY_LIMIT_MIB MiB in all with the working tree)"
  if [ "$mib" -ge "$CARRY_LIMIT_MIB" ]; then
    echo "fetch_wheels: $dir is over the ${CARRY_LIMIT_MIB} MiB a device call carries" >&2
    return 1
  fi
}

# Sourced (by gpu_check.sh, by the tests): the functions only.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
