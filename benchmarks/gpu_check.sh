#!/usr/bin/env bash
# One call on a bare GPU machine (PyTorch, Triton, CMake, nvcc; no network): build pyvf,
# run the GPU tests and the benchmarks, stage by stage, in about 7 minutes on an H100.
#
#   bash benchmarks/gpu_check.sh OUT_DIR            # on the GPU machine
#   bash benchmarks/gpu_check.sh OUT_DIR --dry-run  # anywhere: no build, tiny shapes (CPU
#                                                   # when there is no GPU), same plumbing
#
# Stages, in order, each under its own time limit (seconds; PYVF_GPU_LIMIT_A..E change them):
#   a. build (PYVF_CUDA_ARCHS=9.0a) and pyvf.build_info()                        a_build.json
#   b. the GPU tests (`pytest -m gpu` and the group ops' CUDA cases; bf16 too)     b_tests.json
#   c. lm_head fwd+bwd at N=16384, H=4096, V=151936 bf16: pyvf policy_loss and
#      token_logprobs, full logits, Liger FLCE, Cut Cross-Entropy (default filter
#      and filter_eps=None), QuACK, torch.compile chunked; 6NHV TFLOP/s, peak memory  c_lm_head.json
#   d. grouped_advantages, B = 1e4 .. 1.6e7, vs the PyTorch composite and a copy   d_advantages.json
#   e. one VeriFree training step at the Qwen3-0.6B and 1.7B shapes (random init,
#      bf16): fused vs full-logits tokens/s, and the longest completion that fits   e_train_step.json
# Each stage's JSON is written as soon as the stage ends (stages c-e rewrite theirs after
# every measurement), so a stage stopped by its limit keeps what it finished and is marked
# "timeout". A failing stage or test does not stop the run. Last, a summary table on stdout
# and <date>-<device>.json/.md in OUT_DIR (benchmarks/gpu_report.py); gpu_check.log holds
# everything printed. Eight files in all: what a device call brings back.
#
# Peers travel as wheels: put them in .whl/ (or PYVF_WHEELS), fetched on a machine with
# network access with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 -d .whl \
#     liger-kernel==0.8.5 cut-cross-entropy==25.1.1
# They are installed with --target into a temporary folder put on PYTHONPATH.
set -uo pipefail   # no -e: a failing stage is recorded and the run goes on

OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [--dry-run]}
DRY_RUN=0
if [ "${2:-}" = "--dry-run" ]; then DRY_RUN=1; elif [ -n "${2:-}" ]; then
  echo "gpu_check: unknown option ${2}; the only one is --dry-run" >&2; exit 2; fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(mktemp -d)   # logs and reports that must not land in OUT (8 files come back)
trap 'rm -rf "$WORK"' EXIT
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
start=$SECONDS
PY=${PYTHON:-python3}
SMALL=()
if [ "$DRY_RUN" = 1 ]; then SMALL=(--small); echo "gpu_check: dry run (no build, tiny shapes)"; fi

# Stages to run (PYVF_GPU_STAGES="c e" reruns two of them; leave out a only on a machine
# still warm from a run that built pyvf).
STAGES=" ${PYVF_GPU_STAGES:-a b c d e} "
want() { [[ "$STAGES" == *" $1 "* ]]; }

# Time limits, seconds: 400 in all, which leaves room for the wheel install and report.
LIMIT_A=${PYVF_GPU_LIMIT_A:-100}
LIMIT_B=${PYVF_GPU_LIMIT_B:-80}
LIMIT_C=${PYVF_GPU_LIMIT_C:-120}
LIMIT_D=${PYVF_GPU_LIMIT_D:-25}
LIMIT_E=${PYVF_GPU_LIMIT_E:-75}

# run_stage NAME LIMIT LOG CMD...: runs CMD under LIMIT seconds, its output to the screen
# and LOG; when it is stopped or dies before finishing its JSON, the JSON says so.
run_stage() {
  local name=$1 limit=$2 log=$3; shift 3
  local t0=$SECONDS rc status
  echo "gpu_check: stage $name (limit ${limit} s, at $((SECONDS - start)) s)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status=timeout; else status=failed; fi
  if [ "$rc" != 0 ]; then
    "$PY" benchmarks/gpu_stages.py mark "$OUT/$name.json" --name "$name" --status "$status" --rc "$rc" \
      --seconds $((SECONDS - t0)) --log "$log"
    echo "gpu_check: stage $name $status (exit $rc) after $((SECONDS - t0)) s"
  fi
}

WHEELS=${PYVF_WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    "$WHEELS"/*.whl >"$WORK/peers.log" 2>&1 \
    && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" \
    && echo "gpu_check: peers installed: $(cd "$WHEELS" && ls *.whl | tr '\n' ' ')" \
    || { echo "gpu_check: peer wheels failed to install:"; tail -5 "$WORK/peers.log"; }
else
  echo "gpu_check: no peer wheels in $WHEELS (Liger, Cut Cross-Entropy, QuACK will be reported as not installed)"
fi

# --- a. build -----------------------------------------------------------------------
export PYVF_CUDA_ARCHS="${PYVF_CUDA_ARCHS:-9.0a}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
a0=$SECONDS
if ! want a; then
  echo "gpu_check: stage a_build left out (PYVF_GPU_STAGES)"
elif [ "$DRY_RUN" = 1 ]; then
  echo "gpu_check: dry run: using the build already in place" | tee "$WORK/build.log"
  build_rc=0
else
  echo "gpu_check: stage a_build (limit ${LIMIT_A} s): pip install -e . with PYVF_CUDA_ARCHS=$PYVF_CUDA_ARCHS"
  timeout --kill-after=10 "$LIMIT_A" "$PY" -m pip install --no-build-isolation --no-deps -v -e . \
    >"$WORK/build.log" 2>&1
  build_rc=$?
  if [ "$build_rc" != 0 ] && [ "$build_rc" != 124 ] && [ "$build_rc" != 137 ]; then
    # pip itself can fail (an old setuptools, say): CMake directly, as setup.py drives it.
    tail -15 "$WORK/build.log"
    echo "gpu_check: pip install failed (exit $build_rc); building with CMake directly"
    left=$((LIMIT_A - (SECONDS - a0)))
    { timeout --kill-after=10 "$((left > 10 ? left : 10))" bash -c '
        cmake -S . -B build/cmake -DPython3_EXECUTABLE="$(command -v "$0")" -DCMAKE_BUILD_TYPE=Release \
          $(command -v ninja >/dev/null && echo -G Ninja) \
        && cmake --build build/cmake --parallel "$MAX_JOBS" \
        && cp build/cmake/_C*.so pyvf/' "$PY"
    } >>"$WORK/build.log" 2>&1
    build_rc=$?
  fi
  grep "pyvf: " "$WORK/build.log" || true
  [ "$build_rc" = 0 ] || tail -30 "$WORK/build.log"
fi
if want a; then
  "$PY" benchmarks/gpu_stages.py build "$OUT/a_build.json" --rc "$build_rc" --seconds $((SECONDS - a0)) \
    --log "$WORK/build.log" \
    || echo "gpu_check: the build failed; the stages below run against what imports"
fi

# --- b. GPU tests ----------------------------------------------------------------------
# `-k "gpu or cuda"`: the tests marked gpu (-k matches marker names too) and the CUDA
# parameters of the group ops' tests, which tests/conftest.py's native_backends() does not
# mark. pytest -v lines give the outcomes even when the limit cuts the run short; the
# JUnit report adds the failure messages when it finishes. pytest-xdist spreads the
# Triton compiles over the cores when it is installed.
b0=$SECONDS
if want b; then
  XDIST=()
  if "$PY" -c "import xdist" 2>/dev/null && [ "$DRY_RUN" = 0 ]; then XDIST=(-n 8); fi
  echo "gpu_check: stage b_tests (limit ${LIMIT_B} s): pytest -k 'gpu or cuda' ${XDIST[*]}"
  timeout --kill-after=10 "$LIMIT_B" "$PY" -m pytest tests -k "gpu or cuda" -v -p no:cacheprovider \
    --continue-on-collection-errors "${XDIST[@]}" --junitxml="$WORK/junit.xml" >"$WORK/tests.log" 2>&1
  tests_rc=$?
  tail -3 "$WORK/tests.log"
  "$PY" benchmarks/gpu_stages.py tests "$OUT/b_tests.json" --rc "$tests_rc" --seconds $((SECONDS - b0)) \
    --log "$WORK/tests.log" --junit "$WORK/junit.xml"
  if [ "$tests_rc" = 124 ] || [ "$tests_rc" = 137 ]; then
    "$PY" benchmarks/gpu_stages.py mark "$OUT/b_tests.json" --name b_tests --status timeout --rc "$tests_rc" \
      --seconds $((SECONDS - b0))
    echo "gpu_check: GPU tests stopped at the limit; the outcomes above are those that finished"
  fi
fi

# --- c, d, e: benchmarks ------------------------------------------------------------------
want c && run_stage c_lm_head "$LIMIT_C" "$WORK/c.log" \
  "$PY" benchmarks/gpu_stages.py lm_head "$OUT/c_lm_head.json" "${SMALL[@]}"
want d && run_stage d_advantages "$LIMIT_D" "$WORK/d.log" \
  "$PY" benchmarks/gpu_stages.py advantages "$OUT/d_advantages.json" "${SMALL[@]}"
# The search for the longest completion stops itself 15 s before the limit.
want e && run_stage e_train_step "$LIMIT_E" "$WORK/e.log" \
  "$PY" benchmarks/gpu_stages.py train_step "$OUT/e_train_step.json" "${SMALL[@]}" --budget $((LIMIT_E - 15))

# --- summary ------------------------------------------------------------------------------
echo "gpu_check: done in $((SECONDS - start)) s -> $OUT"
"$PY" benchmarks/gpu_report.py "$OUT" --results-dir "$OUT"
