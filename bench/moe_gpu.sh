#!/usr/bin/env bash
# The fused MoE kernels on one GPU in one command (default budget 540 s): the gpu tests of
# tests/engine/test_gpu_fused_moe.py, the autotune (bench/moe_autotune.py) bounded by what the tests leave, then the
# micro-benchmark (bench/moe_micro.py) using the configs just tuned. Everything it writes lands in $OUT:
#   moe-gpu-tests.log, moe_configs/*.json (commit them into engine/models/moe_configs/), moe-autotune.log,
#   moe-micro-<date>.json/.md (commit into bench/results/), moe-micro.log.
#
#   OUT=/some/dir bash bench/moe_gpu.sh            (TIME_LIMIT, TEST_TIMEOUT, MICRO_S override the budget split)
# Needs torch with CUDA and triton (a missing triton fails the tests); wheels in .gpu/whl are installed if present.
set -uo pipefail
OUT=${OUT:-/tmp/kubellm-out}
TIME_LIMIT=${TIME_LIMIT:-540}
TEST_TIMEOUT=${TEST_TIMEOUT:-240}
MICRO_S=${MICRO_S:-110}
mkdir -p "$OUT/moe_configs"
export PYTHONUNBUFFERED=1
source bench/gpu_site.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

timeout "$TEST_TIMEOUT" python3 -m pytest -q -m gpu -p no:cacheprovider -rs tests/engine/test_gpu_fused_moe.py \
  2>&1 | tee "$OUT/moe-gpu-tests.log"
rc=${PIPESTATUS[0]}

tune_s=$((TIME_LIMIT - SECONDS - MICRO_S))
if [ "$tune_s" -gt 30 ]; then
  timeout "$tune_s" python3 -m bench.moe_autotune --out-dir "$OUT/moe_configs" --deadline-s $((tune_s - 25)) \
    2>&1 | tee "$OUT/moe-autotune.log"
  rc=$((rc | PIPESTATUS[0]))
  mkdir -p engine/models/moe_configs  # the micro-benchmark runs with the configs just tuned
  cp "$OUT"/moe_configs/*.json engine/models/moe_configs/ 2>/dev/null
fi

left=$((TIME_LIMIT - SECONDS - 10))
timeout "$left" python3 -m bench.moe_micro --out-dir "$OUT" --deadline-s $((left - 30)) 2>&1 | tee "$OUT/moe-micro.log"
rc=$((rc | PIPESTATUS[0]))
echo "moe_gpu.sh: exit $rc after ${SECONDS}s"
exit $rc
