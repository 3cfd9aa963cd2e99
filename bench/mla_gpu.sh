#!/usr/bin/env bash
# DeepSeek's multi-head latent attention path on one GPU in one command (default budget 540 s), through
# bench/gpu_run.sh (flashinfer wheels from .gpu/whl, prebuilt kernels, kernels built here packed into $OUT):
#   1. the gpu tests of tests/engine/test_gpu_mla.py (flashinfer MLA vs the torch reference on one paged latent pool,
#      the fused MLA rope, a DeepSeek-V2-Lite-shaped model GPU vs CPU, CUDA-graph decode == eager): gpu-tests.log;
#   2. bench/mla_micro.py with what the tests leave (MLA decode vs its floor, fa2 and fa3; absorbed vs the engine's
#      up-projected prefill per chunk length, over no prefix and a 4096-token one):
#      mla-micro-<date>.json/.md (commit into bench/results/), mla-micro.log.
#
#   OUT=/some/dir bash bench/mla_gpu.sh          (TIME_LIMIT, TEST_TIMEOUT override the budget split)
set -uo pipefail
TIME_LIMIT=${TIME_LIMIT:-540}
TEST_TIMEOUT=${TEST_TIMEOUT:-360}
TESTS=tests/engine/test_gpu_mla.py TEST_TIMEOUT=$TEST_TIMEOUT TIME_LIMIT=$TIME_LIMIT bash bench/gpu_run.sh test
rc=$?
left=$((TIME_LIMIT - SECONDS - 10))
if [ "$left" -gt 90 ]; then
  TIME_LIMIT=$left bash bench/gpu_run.sh mla-micro
  rc=$((rc | $?))
else
  echo "mla_gpu.sh: ${left}s left, bench/mla_micro.py not run"
fi
echo "mla_gpu.sh: exit $rc after ${SECONDS}s"
exit $rc
