#!/usr/bin/env bash
# One call on a bare GPU machine (PyTorch, Triton, CMake, nvcc; no network): build pyvf,
# run the lm_head benchmarks, the GPU tests and the other benchmarks, stage by stage, in
# at most 9 minutes (PYVF_GPU_TOTAL, 540 s), so that a device call of timeout_s=600 always
# ends with the summary and brings back every file.
#
#   bash benchmarks/gpu_check.sh OUT_DIR            # on the GPU machine
#   bash benchmarks/gpu_check.sh OUT_DIR --dry-run  # anywhere: no build, tiny shapes (CPU
#                                                   # when there is no GPU), same plumbing
#
# Stages, in this order, each under its own time limit (seconds; PYVF_GPU_LIMIT_A..E change them):
#   a. build (PYVF_CUDA_ARCHS=9.0a) and pyvf.build_info()                        a_build.json
#   c. lm_head fwd+bwd at N=16384, H=4096, V=151936 bf16, logits of std ~3: pyvf
#      policy_loss and token_logprobs, full logits, Liger FLCE, Cut Cross-Entropy
#      (default filter and filter_eps=None), QuACK, torch.compile chunked; 6NHV
#      TFLOP/s, peak memory                                                       c_lm_head.json
#   b. the GPU tests (`pytest -m gpu` and the group ops' CUDA cases; bf16 too)     b_tests.json
#   d. grouped_advantages, B = 1e4 .. 1.6e7, vs the PyTorch composite and a copy,
#      timed with CUDA events                                                      d_advantages.json
#   e. one VeriFree training step at the Qwen3-0.6B and 1.7B shapes (random init,
#      bf16): fused vs full-logits tokens/s, and the longest completion that fits   e_train_step.json
# The lm_head benchmarks run before the tests so that a slow first compile in the tests
# cannot take the headline numbers' time. Each stage's JSON is written as the stage goes
# (c-e rewrite theirs after every measurement), so a stage stopped by its limit keeps what
# it finished and is marked "timeout"; a stage the 9 minutes leave no time for is marked
# "skipped". A failing stage or test does not stop the run. Last, a summary table on stdout
# and <date>-<device>.json/.md in OUT_DIR (benchmarks/gpu_report.py); gpu_check.log holds
# everything printed, the stages' output included. Eight files in all: what a device call
# brings back; the script fails when OUT_DIR holds more, or a temporary file. Exit status:
# 0 once the report is written (read the table for failures); with --dry-run, 1 unless
# every stage run is "ok" (CI runs it).
#
# Peers travel as wheels in .whl/ (or PYVF_WHEELS): `bash benchmarks/fetch_wheels.sh` fills
# it where pip reaches PyPI; carry it with the device call. They are installed with
# --target into a temporary folder put first on PYTHONPATH, so torch, triton and nvidia-*
# wheels are refused (they would shadow the machine's own CUDA torch).
set -uo pipefail   # no -e: a failing stage is recorded and the run goes on

# shellcheck source=benchmarks/fetch_wheels.sh
source "$(dirname "${BASH_SOURCE[0]}")/fetch_wheels.sh"   # wheel_name, wheel_refusal

MAX_FILES=8          # what a device call brings back from OUT
GRACE=${PYVF_GPU_KILL_GRACE:-5}   # seconds between SIGTERM and SIGKILL at a stage's limit
RESERVE=20           # seconds kept after the last stage for the report and the checks
MIN_STAGE=10         # a stage with less time than this left is skipped
# A process group of its own for a stage, in gpu_check's session: a session of its own
# (setsid) would outlive gpu_check itself, since the device machine ends what a command
# leaves running except processes that started their own session.
NEWPGRP='import os, sys; os.setpgid(0, 0); os.execvp(sys.argv[1], sys.argv[1:])'
STAGE_PGID=

# say TEXT: to the screen and the log. A pipeline in the foreground, not `exec > >(tee)`:
# bash waits for it, so nothing printed last (the summary) is lost when the script ends.
say() { printf '%s\n' "$*" | tee -a "$LOG"; }

log_size() { wc -c <"$LOG" | tr -d ' '; }

# run_limited LIMIT OUTFILE CMD...: runs CMD with its output appended to OUTFILE, in a
# process group of its own, and ends the whole group when CMD ends or at LIMIT seconds
# (SIGTERM, SIGKILL GRACE seconds later). `timeout` waits only for its own child: the
# pytest-xdist workers and inductor compile workers it left ran on into the next stage.
# Sets RUN_RC (CMD's exit status; 124 when stopped at the limit) and RUN_TIMED_OUT.
run_limited() {
  local limit=$1 outfile=$2 pid t_end
  shift 2
  "$PY" -c "$NEWPGRP" "$@" >>"$outfile" 2>&1 </dev/null &
  pid=$!
  STAGE_PGID=$pid   # the group's id is its leader's pid
  t_end=$((SECONDS + limit))
  RUN_TIMED_OUT=0
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$SECONDS" -ge "$t_end" ]; then
      RUN_TIMED_OUT=1
      kill -TERM -- -"$pid" 2>/dev/null
      t_end=$((SECONDS + GRACE))
      while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$t_end" ]; do sleep 0.2; done
      break
    fi
    sleep 0.2
  done
  kill -KILL -- -"$pid" 2>/dev/null
  wait "$pid" 2>/dev/null   # no "Killed" notice: the stage's status says it
  RUN_RC=$?
  [ "$RUN_TIMED_OUT" = 1 ] && RUN_RC=124
  # Killed processes hold the GPU until they have exited: wait for that before the next stage.
  t_end=$((SECONDS + GRACE))
  while [ -n "$(group_members "$pid")" ] && [ "$SECONDS" -lt "$t_end" ]; do sleep 0.2; done
  local left
  left=$(group_members "$pid")
  [ -z "$left" ] || say "gpu_check: processes ${left}of group $pid ($*) remain after SIGKILL"
  STAGE_PGID=
}

# group_members PGID: the processes of group PGID that have not exited (zombies aside:
# a slow init can leave the killed ones unreaped for a while), from /proc; without /proc,
# any process of the group.
group_members() {
  local f line state ppid pgrp
  if [ ! -r /proc/self/stat ]; then
    kill -0 -- -"$1" 2>/dev/null && echo "some "
    return 0
  fi
  for f in /proc/[0-9]*/stat; do
    read -r line 2>/dev/null <"$f" || continue
    read -r state ppid pgrp _ <<<"${line##*) }"
    [ "$pgrp" = "$1" ] && [ "$state" != Z ] && printf '%s ' "${f:6:-5}"
  done
}

# peer_wheels DIR: sets PEER_WHEELS to the wheels of DIR gpu_check may install, saying
# why it leaves out the others (wheel_refusal, two versions of one package).
peer_wheels() {
  local f reason dups
  PEER_WHEELS=()
  for f in "$1"/*.whl; do
    [ -e "$f" ] || continue
    reason=$(wheel_refusal "$f")
    if [ -n "$reason" ]; then
      say "gpu_check: not installing $reason"
    else
      PEER_WHEELS+=("$f")
    fi
  done
  [ "${#PEER_WHEELS[@]}" -gt 0 ] || return 0
  dups=$(for f in "${PEER_WHEELS[@]}"; do wheel_name "$f"; done | sort | uniq -d | tr '\n' ' ')
  if [ -n "$dups" ]; then
    say "gpu_check: not installing any peer: $1 holds two versions of ${dups% }, which stops a pip install; delete one"
    PEER_WHEELS=()
  fi
}

# begin_stage NAME CAP: sets STAGE_LIMIT to CAP, or less when the run's deadline comes
# first; returns 1, the stage marked "skipped", when too little time is left for it.
begin_stage() {
  local name=$1 cap=$2 left
  left=$((TOTAL - RESERVE - GRACE - (SECONDS - start)))
  left=$((left > 0 ? left : 0))
  STAGE_LIMIT=$((cap < left ? cap : left))
  if [ "$STAGE_LIMIT" -lt "$MIN_STAGE" ]; then
    say "gpu_check: stage $name skipped: ${left} s left of the run's ${TOTAL} s"
    "$PY" benchmarks/gpu_stages.py mark "$OUT/$name.json" --name "$name" --status skipped --rc 0 \
      --reason "skipped: ${left} s left of the run's ${TOTAL} s (PYVF_GPU_TOTAL)" 2>&1 | tee -a "$LOG"
    return 1
  fi
  say "gpu_check: stage $name (limit ${STAGE_LIMIT} s, at $((SECONDS - start)) s)"
}

# run_stage NAME CMD...: runs a benchmark stage under STAGE_LIMIT, its output into the
# log as it comes (a call cut short still brings it back), then on the screen; when it is
# stopped or dies before finishing its JSON, the JSON says so.
run_stage() {
  local name=$1 t0=$SECONDS off status
  shift
  off=$(log_size)
  run_limited "$STAGE_LIMIT" "$LOG" "$@"
  tail -c +"$((off + 1))" "$LOG" >"$WORK/$name.log"
  cat "$WORK/$name.log"
  if [ "$RUN_RC" != 0 ]; then
    if [ "$RUN_TIMED_OUT" = 1 ]; then status=timeout; else status=failed; fi
    "$PY" benchmarks/gpu_stages.py mark "$OUT/$name.json" --name "$name" --status "$status" --rc "$RUN_RC" \
      --seconds $((SECONDS - t0)) --log "$WORK/$name.log" 2>&1 | tee -a "$LOG"
    say "gpu_check: stage $name $status (exit $RUN_RC) after $((SECONDS - t0)) s"
  fi
}

# check_out: fails, naming them, when OUT holds more files than a device call brings
# back, or a temporary file.
check_out() {
  local files tmps
  mapfile -t files < <(cd "$OUT" && find . -type f | sed 's|^\./||' | sort)
  tmps=$(printf '%s\n' "${files[@]}" | grep -E '\.tmp$|\.part$|~$' | tr '\n' ' ')
  if [ "${#files[@]}" -gt "$MAX_FILES" ]; then
    say "gpu_check: $OUT holds ${#files[@]} files, more than the $MAX_FILES a device call brings back: ${files[*]}"
    return 1
  fi
  if [ -n "$tmps" ]; then
    say "gpu_check: temporary files left in $OUT: $tmps"
    return 1
  fi
  say "gpu_check: $OUT holds ${#files[@]} files (at most $MAX_FILES come back): ${files[*]}"
}

cleanup() {
  [ -n "$STAGE_PGID" ] && kill -KILL -- -"$STAGE_PGID" 2>/dev/null
  rm -rf "$WORK"
}

# Sourced (by the tests): the functions only.
[[ "${BASH_SOURCE[0]}" != "$0" ]] && return 0

OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [--dry-run]}
DRY_RUN=0
if [ "${2:-}" = "--dry-run" ]; then DRY_RUN=1; elif [ -n "${2:-}" ]; then
  echo "gpu_check: unknown option ${2}; the only one is --dry-run" >&2; exit 2; fi
mkdir -p "$OUT" || { echo "gpu_check: cannot create $OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
ROOT=$PWD
LOG="$OUT/gpu_check.log"
PY=${PYTHON:-python3}

# Time limits, seconds. The run ends within TOTAL: a stage gets its limit or what is left
# of TOTAL (less RESERVE and a kill's GRACE), so when earlier stages run long the later
# ones get less, the last (e, which stops its own search in time) first.
TOTAL=${PYVF_GPU_TOTAL:-540}
LIMIT_PEERS=60
LIMIT_A=${PYVF_GPU_LIMIT_A:-100}   # one .cu and a few .cpp against the torch headers, 16 jobs
LIMIT_C=${PYVF_GPU_LIMIT_C:-150}   # first calls compile: Triton autotunes every config of
                                   # pyvf's kernels, Liger and CCE theirs; torch.compile last
LIMIT_B=${PYVF_GPU_LIMIT_B:-180}   # ~155 tests; each kernel specialization compiles on first
                                   # use (80 s was too tight for them)
LIMIT_D=${PYVF_GPU_LIMIT_D:-30}
LIMIT_E=${PYVF_GPU_LIMIT_E:-90}    # two model shapes, their step and longest-fit searches
for var in PYVF_GPU_TOTAL PYVF_GPU_KILL_GRACE PYVF_GPU_LIMIT_A PYVF_GPU_LIMIT_B PYVF_GPU_LIMIT_C \
    PYVF_GPU_LIMIT_D PYVF_GPU_LIMIT_E; do
  if [ -n "${!var:-}" ] && ! [[ "${!var}" =~ ^[0-9]+$ ]]; then
    echo "gpu_check: $var must be a whole number of seconds, not '${!var}'" >&2; exit 2
  fi
done
# Stages to run (PYVF_GPU_STAGES="c e" reruns two of them; leave out a only on a machine
# still warm from a run that built pyvf).
STAGES=" ${PYVF_GPU_STAGES:-a c b d e} "
if ! [[ "$STAGES" =~ ^[[:space:]abcde]*$ ]]; then
  echo "gpu_check: PYVF_GPU_STAGES='${PYVF_GPU_STAGES}' names a stage other than a b c d e" >&2; exit 2
fi
want() { [[ "$STAGES" == *" $1 "* ]]; }

# Temporary files, logs and peers outside OUT: only 8 files come back from it.
start=$SECONDS
WORK=$(mktemp -d) || { echo "gpu_check: mktemp -d failed" >&2; exit 2; }
trap cleanup EXIT
trap 'say "gpu_check: stopped by a signal at $((SECONDS - start)) s"; exit 143' TERM INT HUP
export PYVF_GPU_TMPDIR="$WORK/kept"   # gpu_stages.py's temporary and kept copies
export PYTHONUNBUFFERED=1             # a stage's lines reach the log before a kill
SMALL=()
say "gpu_check: $(date -u +%FT%TZ), OUT=$OUT, ends within ${TOTAL} s"
if [ "$DRY_RUN" = 1 ]; then SMALL=(--small); say "gpu_check: dry run (no build, tiny shapes)"; fi

# --- peers -----------------------------------------------------------------------------
WHEELS=${PYVF_WHEELS:-.whl}
peer_wheels "$WHEELS"
if [ "${#PEER_WHEELS[@]}" -gt 0 ]; then
  run_limited "$LIMIT_PEERS" "$WORK/peers.log" "$PY" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$WORK/site" "${PEER_WHEELS[@]}"
  if [ "$RUN_RC" = 0 ]; then
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    say "gpu_check: peers installed: $(for f in "${PEER_WHEELS[@]}"; do printf '%s ' "${f##*/}"; done)"
  else
    say "gpu_check: peer wheels failed to install (exit $RUN_RC):"
    tail -5 "$WORK/peers.log" | tee -a "$LOG"
  fi
elif ! compgen -G "$WHEELS/*.whl" >/dev/null; then
  say "gpu_check: no peer wheels in $WHEELS (bash benchmarks/fetch_wheels.sh fills it; carry it with the call):" \
    "Liger and Cut Cross-Entropy will be reported as not installed"
fi

# --- a. build ---------------------------------------------------------------------------
export PYVF_CUDA_ARCHS="${PYVF_CUDA_ARCHS:-9.0a}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if ! want a; then
  say "gpu_check: stage a_build left out (PYVF_GPU_STAGES)"
elif begin_stage a_build "$LIMIT_A"; then
  a0=$SECONDS
  if [ "$DRY_RUN" = 1 ]; then
    say "gpu_check: dry run: no build, the build in place"
    run_limited "$STAGE_LIMIT" "$WORK/build.log" \
      "$PY" -c "import pyvf; print('pyvf: build in place:', pyvf.build_info())"
  else
    say "gpu_check: pip install -e . with PYVF_CUDA_ARCHS=$PYVF_CUDA_ARCHS"
    run_limited "$STAGE_LIMIT" "$WORK/build.log" "$PY" -m pip install --no-build-isolation --no-deps -v -e .
    if [ "$RUN_RC" != 0 ] && [ "$RUN_TIMED_OUT" = 0 ]; then
      # pip itself can fail (an old setuptools, say): CMake directly, as setup.py drives it.
      tail -15 "$WORK/build.log" | tee -a "$LOG"
      say "gpu_check: pip install failed (exit $RUN_RC); building with CMake directly"
      left=$((STAGE_LIMIT - (SECONDS - a0)))
      run_limited "$((left > 10 ? left : 10))" "$WORK/build.log" bash -c '
        cmake -S . -B build/cmake -DPython3_EXECUTABLE="$(command -v "$0")" -DCMAKE_BUILD_TYPE=Release \
          $(command -v ninja >/dev/null && echo -G Ninja) \
        && cmake --build build/cmake --parallel "$MAX_JOBS" \
        && cp build/cmake/_C*.so pyvf/' "$PY"
    fi
  fi
  build_rc=$RUN_RC build_timed_out=$RUN_TIMED_OUT
  grep "pyvf: " "$WORK/build.log" | tee -a "$LOG"
  [ "$build_rc" = 0 ] || tail -30 "$WORK/build.log" | tee -a "$LOG"
  "$PY" benchmarks/gpu_stages.py build "$OUT/a_build.json" --rc "$build_rc" --seconds $((SECONDS - a0)) \
    --log "$WORK/build.log" 2>&1 | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" = 0 ] || say "gpu_check: the build failed; the stages below run against what imports"
  if [ "$build_timed_out" = 1 ]; then
    "$PY" benchmarks/gpu_stages.py mark "$OUT/a_build.json" --name a_build --status timeout --rc 124 \
      --seconds $((SECONDS - a0)) --log "$WORK/build.log" 2>&1 | tee -a "$LOG"
  fi
fi

# --- c. lm_head ---------------------------------------------------------------------------
want c && begin_stage c_lm_head "$LIMIT_C" \
  && run_stage c_lm_head "$PY" benchmarks/gpu_stages.py lm_head "$OUT/c_lm_head.json" "${SMALL[@]}"

# --- b. GPU tests -------------------------------------------------------------------------
# `-k "gpu or cuda"`: the tests marked gpu (-k matches marker names too) and the CUDA
# parameters of the group ops' tests, which tests/conftest.py's native_backends() does not
# mark; not tests/bench/test_gpu_check.py (this script's own, CPU tests, "gpu" in the
# name). pytest -v lines give the outcomes even when the limit cuts the run short; the
# JUnit report adds the failure messages when it finishes. pytest-xdist spreads the
# Triton compiles over the cores when it is installed.
if want b && begin_stage b_tests "$LIMIT_B"; then
  b0=$SECONDS
  XDIST=()
  if "$PY" -c "import xdist" 2>/dev/null && [ "$DRY_RUN" = 0 ]; then XDIST=(-n 8); fi
  say "gpu_check: pytest -k '(gpu or cuda) and not gpu_check' ${XDIST[*]}"
  off=$(log_size)
  run_limited "$STAGE_LIMIT" "$LOG" "$PY" -m pytest tests -k "(gpu or cuda) and not gpu_check" -v \
    -p no:cacheprovider --continue-on-collection-errors "${XDIST[@]}" --junitxml="$WORK/junit.xml"
  tests_rc=$RUN_RC tests_timed_out=$RUN_TIMED_OUT
  tail -c +"$((off + 1))" "$LOG" >"$WORK/tests.log"
  tail -40 "$WORK/tests.log"
  "$PY" benchmarks/gpu_stages.py tests "$OUT/b_tests.json" --rc "$tests_rc" --seconds $((SECONDS - b0)) \
    --log "$WORK/tests.log" --junit "$WORK/junit.xml" 2>&1 | tee -a "$LOG"
  if [ "$tests_timed_out" = 1 ]; then
    "$PY" benchmarks/gpu_stages.py mark "$OUT/b_tests.json" --name b_tests --status timeout --rc "$tests_rc" \
      --seconds $((SECONDS - b0)) 2>&1 | tee -a "$LOG"
    say "gpu_check: GPU tests stopped at the limit; the outcomes above are those that finished"
  fi
fi

# --- d, e: benchmarks -----------------------------------------------------------------------
want d && begin_stage d_advantages "$LIMIT_D" \
  && run_stage d_advantages "$PY" benchmarks/gpu_stages.py advantages "$OUT/d_advantages.json" "${SMALL[@]}"
# The search for the longest completion stops itself 15 s before the limit.
want e && begin_stage e_train_step "$LIMIT_E" \
  && run_stage e_train_step "$PY" benchmarks/gpu_stages.py train_step "$OUT/e_train_step.json" "${SMALL[@]}" \
    --budget $((STAGE_LIMIT > 30 ? STAGE_LIMIT - 15 : STAGE_LIMIT / 2))

# --- summary ------------------------------------------------------------------------------
say "gpu_check: done in $((SECONDS - start)) s -> $OUT"
REQUIRE=()
if [ "$DRY_RUN" = 1 ]; then
  required=$(for s in a_build c_lm_head b_tests d_advantages e_train_step; do
    want "${s:0:1}" && printf '%s,' "$s"; done)
  REQUIRE=(--require-ok "${required%,}")
fi
"$PY" benchmarks/gpu_report.py "$OUT" --results-dir "$OUT" "${REQUIRE[@]}" 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
check_out || status=1
exit "$status"
