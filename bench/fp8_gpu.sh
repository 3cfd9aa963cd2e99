#!/usr/bin/env bash
# The FP8 kernels on one GPU in one command (default budget 540 s): the gpu tests of tests/engine/test_gpu_fp8_gemm.py
# and test_gpu_fp8_moe.py, then the micro-benchmarks: bench/fp8_micro.py (Llama-3.1-8B GEMMs, bf16 vs our FP8
# paths vs the roofline, fused quantization, flashinfer's block GEMM in a bounded child) and bench/moe_micro.py on
# Qwen3-30B-A3B's experts in FP8 blocks and bf16 side by side. Everything it writes lands in $OUT:
#   fp8-gpu-tests.log, fp8-micro-<date>.json/.md + fp8-micro.log, moe-micro-<date>-fp8-block.json/.md,
#   moe-micro-<date>.json/.md + moe-micro.log (commit the json/md into bench/results/).
#
#   OUT=/some/dir bash bench/fp8_gpu.sh        (TIME_LIMIT, TEST_TIMEOUT, MICRO_S, FLASHINFER_S override the split)
#   OUT=/some/dir SKIP_TESTS=1 FLASHINFER_S=330 bash bench/fp8_gpu.sh
#        a second run for flashinfer's sm90 block GEMM (its first-use JIT build time is unknown, so by default it is
#        not tried); set FLASHINFER_BLOCK_MIN_ROWS in engine/models/fp8_gemm.py from where it beats `block`.
#   OUT=/some/dir SKIP_TESTS=1 MICRO_S=0 TUNE_S=400 bash bench/fp8_gpu.sh
#        also tunes the FP8 MoE tiles of Qwen3-30B-A3B (bench/moe_autotune.py --dtype fp8) into $OUT/moe_configs/
#        (commit into engine/models/moe_configs/); the MoE micro-benchmark then runs with them.
# Needs torch with CUDA and triton (a missing triton fails the tests); wheels in .gpu/whl are installed if present.
set -uo pipefail
OUT=${OUT:-/tmp/kubellm-out}
TIME_LIMIT=${TIME_LIMIT:-540}
TEST_TIMEOUT=${TEST_TIMEOUT:-260}
MICRO_S=${MICRO_S:-180}
FLASHINFER_S=${FLASHINFER_S:-0}
SKIP_TESTS=${SKIP_TESTS:-0}
TUNE_S=${TUNE_S:-0}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source bench/gpu_site.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

rc=0
if [ "$SKIP_TESTS" = 0 ]; then
  # one pytest per file, each with its share of the time (a timeout in the first must not starve the second);
  # -v: a killed run still shows which tests passed
  for f in gemm:$((TEST_TIMEOUT * 55 / 100)) moe:$((TEST_TIMEOUT * 45 / 100)); do
    timeout "${f#*:}" python3 -m pytest -v -m gpu -p no:cacheprovider -rs --tb=short --durations=10 \
      "tests/engine/test_gpu_fp8_${f%%:*}.py" 2>&1 | tee -a "$OUT/fp8-gpu-tests.log"
    rc=$((rc | PIPESTATUS[0]))
  done
else
  MICRO_S=$((MICRO_S + FLASHINFER_S))
fi

micro_s=$((TIME_LIMIT - SECONDS - 90 < MICRO_S ? TIME_LIMIT - SECONDS - 90 : MICRO_S))
if [ "$micro_s" -gt 60 ]; then
  timeout "$micro_s" python3 -m bench.fp8_micro --out-dir "$OUT" --deadline-s $((micro_s - FLASHINFER_S - 25)) \
    --flashinfer-timeout-s "$FLASHINFER_S" 2>&1 | tee "$OUT/fp8-micro.log"
  rc=$((rc | PIPESTATUS[0]))
fi

if [ "$TUNE_S" -gt 0 ]; then
  mkdir -p "$OUT/moe_configs"
  timeout "$TUNE_S" python3 -m bench.moe_autotune --dtype fp8 --shapes qwen3-30b-a3b --out-dir "$OUT/moe_configs" \
    --deadline-s $((TUNE_S - 25)) 2>&1 | tee "$OUT/moe-autotune-fp8.log"
  rc=$((rc | PIPESTATUS[0]))
  cp "$OUT"/moe_configs/*.json engine/models/moe_configs/ 2>/dev/null
fi

for dtype in fp8-block bf16; do  # the same experts, FP8 first (bf16 has been measured before; FP8 never)
  left=$((TIME_LIMIT - SECONDS - 10))
  [ "$dtype" = fp8-block ] && left=$((left / 2 + 5))
  if [ "$left" -gt 30 ]; then
    timeout "$left" python3 -m bench.moe_micro --out-dir "$OUT" --dtype "$dtype" --shapes qwen3-30b-a3b \
      --batches 1,32,256,1024,4096 --deadline-s $((left - 25)) 2>&1 | tee -a "$OUT/moe-micro.log"
    rc=$((rc | PIPESTATUS[0]))
  fi
done
echo "fp8_gpu.sh: exit $rc after ${SECONDS}s"
exit $rc
