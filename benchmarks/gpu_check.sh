#!/usr/bin/env bash
# One call on a bare GPU machine (PyTorch, Triton, CMake, nvcc; no network): build
# pyvf, run the GPU tests and the benchmark suite, write everything to OUT_DIR.
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# Optional peers (Liger-Kernel, Cut Cross-Entropy) are installed from wheels in
# ./wheels when present. Outputs: build.log, tests.log, lm_head-<device>-<date>.json/.md
# (policy_loss and its peers at the headline shape, written as soon as that stage ends),
# <device>-<date>.json/.md/.png (pyvf bench), longest.json (longest trainable completion).
set -euo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
start=$(date +%s)

if compgen -G "wheels/*.whl" >/dev/null; then
  pip install --no-deps --no-index wheels/*.whl >"$OUT/peers.log" 2>&1 || echo "gpu_check: some peer wheels failed, see peers.log"
fi
export PYVF_CUDA_ARCHS="${PYVF_CUDA_ARCHS:-9.0a}" MAX_JOBS="${MAX_JOBS:-16}"
pip install --no-build-isolation --no-deps -v -e . >"$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
grep "pyvf: " "$OUT/build.log" || true
python -c "import pyvf, json; print(json.dumps(pyvf.build_info()))" | tee -a "$OUT/build.log"

echo "gpu_check: GPU tests"
python -m pytest -q tests/test_token_logprobs.py tests/test_policy_loss.py tests/test_grouped_advantages.py \
  tests/test_segment_sum.py -k "cuda or triton or gpu" 2>&1 | tee "$OUT/tests.log" | tail -5 \
  || echo "gpu_check: GPU tests failed, see tests.log"

name=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")-$(date +%Y-%m-%d)
echo "gpu_check: stage c: lm_head forward+backward at N=16384, H=4096, V=151936 bf16 -> lm_head-$name.json"
timeout 240 python - "$OUT/lm_head-$name.json" <<'PY' || echo "gpu_check: lm_head stage stopped early"
import sys, torch
from pyvf.bench import format_table, write_results
from pyvf.bench.policy_loss import bench_policy_loss
dev = torch.device("cuda")
records = bench_policy_loss(16384, 4096, 151936, torch.bfloat16, dev)
print(format_table(records), flush=True)
write_results(records, sys.argv[1], dev, "bash benchmarks/gpu_check.sh (stage c: pyvf.bench.policy_loss.bench_policy_loss)")
PY

echo "gpu_check: pyvf bench -> $name.json"
timeout 360 pyvf bench --output "$OUT/$name.json" 2>&1 | tee "$OUT/bench.log" | tail -40 || echo "gpu_check: bench stopped early"

echo "gpu_check: longest trainable completion (Qwen3-1.7B shape)"
timeout 120 python - "$OUT/longest.json" <<'PY' || echo "gpu_check: longest-length search stopped early"
import json, sys, torch
from pyvf.bench import longest_trainable
res = {impl: longest_trainable("qwen3-1.7b", impl, torch.device("cuda"), torch.bfloat16, n_seq=1)
       for impl in ("pyvf", "full-logits")}
print(res)
json.dump(res, open(sys.argv[1], "w"), indent=2)
PY
echo "gpu_check: done in $(( $(date +%s) - start )) s -> $OUT"
