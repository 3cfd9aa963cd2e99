#!/usr/bin/env bash
# The one script for a bare GPU machine (no network): install flashinfer and the few missing wheels carried in
# .gpu/whl, restore prebuilt flashinfer kernels, run the gpu-marked tests and/or the offline benchmark, and pack
# any kernel built here for the next run. Everything it writes lands in $OUT.
#
# BEFORE a lease, on this side: `make compile-check` (every Triton kernel the engine launches compiled for sm90 here, no
# GPU needed, a few minutes): a kernel Triton refuses costs a GPU run otherwise, as mla_rope_cache's did on 2026-12-07.
#
#   bench/gpu_run.sh test|bench|all [args for python -m bench.offline]
#   bench/gpu_run.sh tp [args for python -m bench.offline]     (a 2- or 4-GPU machine)
#   bench/gpu_run.sh peer [args for python -m bench.peer_vllm] (vLLM, installed in $VSITE by vllm-install.sh)
#   bench/gpu_run.sh structured --tokenizer-json bench/smollm2-tokenizer.json [--peer vllm]  (bench/structured.py:
#                    JSON schema vs unconstrained; --peer vllm runs vLLM from $VSITE first, ~200 s of the 540)
#   bench/gpu_run.sh structured-host --tokenizer-json bench/smollm2-tokenizer.json --name h200  (bench/structured_host.py:
#                    the grammar's per-step host work on this machine's CPUs: mask fill 1 thread vs pool, accepts)
#   bench/gpu_run.sh mla-micro                 (bench/mla_micro.py: DeepSeek's MLA attention alone, one layer)
#   bench/gpu_run.sh startup [args for python -m bench.startup]  (start-up from a local safetensors directory,
#                    written once to --dir, default /tmp/llama8b; add --peer vllm once vLLM is in $VSITE)
#
# The peer side by side (vLLM 0.26.0 on the same machine; each transfer carries at most 64 MiB, and the machine stays
# warm for 30 s between calls, so the calls follow each other at once). Here, in a fresh checkout: `bash
# bench/gpu_prepare.sh` (.gpu/whl, the tokenizer, vLLM's five transfer folders .gpu/v0 .. .gpu/v4). Then:
#   1-5. one call per folder, carrying only it: `bash bench/gpu_transfer.sh` (the fifth installs vLLM into /tmp/vsite)
#   6.   WHEELS=.gpu/whl bench/gpu_run.sh peer --shape llama-3.1-8b --scale 0.5 --json-out /tmp/peer.json
#   7.   WHEELS=.gpu/whl bench/gpu_run.sh bench --shape llama-3.1-8b --scale 0.5 --peer-json /tmp/peer.json
# (or 6+7 as one: bench --peer vllm ..., when one command's 10 minutes hold both engines' start-up and workloads).
# --profile (bench mode) profiles one prefill step and decode steps at batch 1 and 256 of ours, and with --peer vllm
# passes itself on to bench.peer_vllm, which profiles vLLM's the same way: the report prints them side by side
# (e.g. bench --peer vllm --profile --workloads 1,d --peer-workloads 1 --decode-batches 1,256 --scale 0.5).
# `peer --profile` alone writes the peer's profiles into its JSON for a later --peer-json run.
#
# tp: the tensor-parallel gpu tests (tests/engine/test_gpu_tensor_parallel.py; TP_TESTS=0 skips them), then the
# offline benchmark at TP 1,2 (and 4 when there are 4 GPUs): workloads (a), (b) and batch-1 decode, scale
# TP_BENCH=0 skips the benchmark; TP_SCALE (default 0.5), results engine-gpu-<date>-tp<N>.* and the comparison engine-gpu-<date>-tp.*.
#
# Kernels: flashinfer loads a module without building when <pkg>/data/aot/<name>/<name>.so exists, so prebuilt
# .so files (from .gpu/kcache/*.tgz, or a ~/.cache/flashinfer restored by .gpu/kernel-cache.sh) are copied there.
# They can be built on a machine without a GPU (nvcc 13 only): flashinfer's gen_batch_decode_module and
# gen_batch_prefill_module("fa2", ...) .build() with FLASHINFER_CUDA_ARCH_LIST=9.0a CUDA_VISIBLE_DEVICES="" and a
# CUDA_HOME whose lib64/stubs holds a libcuda.so (soname libcuda.so.1) to link against; FA3 also needs curand
# headers, which is one reason the engine uses FA2 prefill. .gpu/kcache/prebuilt-sm90a-bf16-hd64-hd128.tgz was
# made that way (2 cores: ~80 s per decode module, ~240-340 s per FA2 prefill module).
# TESTS: the test paths of the test/all modes instead of the default set; EXTRA_TESTS: more test paths beside them. TIME_LIMIT (s, default 540) bounds the whole script: the benchmark gets what the tests leave.
set -uo pipefail
mode=${1:-all}
shift || true
OUT=${OUT:-/tmp/kubellm-out}
TIME_LIMIT=${TIME_LIMIT:-540}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

site=/tmp/site
WHEELS=${WHEELS:-.gpu/whl}
VSITE=${VSITE:-/tmp/vsite}
# Prebuilt flashinfer kernels (.gpu/kcache/*.tgz, and whatever this machine built before) into a flashinfer install's
# AOT folder, where it loads them without building: ours in $site, vLLM's in $VSITE (its sampler's module alone
# took ~100 s to build on an H100 at its first start, 2026-12-07).
restore_kernels() {
  local aot="$1/flashinfer/data/aot"
  [ -d "$1/flashinfer" ] || return 0
  mkdir -p "$aot"
  for tgz in .gpu/kcache/*.tgz; do [ -f "$tgz" ] && tar -C "$aot" -xzf "$tgz"; done
  for so in "$HOME"/.cache/flashinfer/*/*/cached_ops/*/*.so; do
    [ -f "$so" ] || continue
    name=$(basename "$(dirname "$so")")
    mkdir -p "$aot/$name"
    [ -e "$aot/$name/$(basename "$so")" ] || cp "$so" "$aot/$name/"  # (cp --update=none needs coreutils 9.3+)
  done
  echo "prebuilt flashinfer kernels in $1: $(ls "$aot" | wc -l)"
}
# Kernels built on this machine (JIT) travel back as one small archive of .so files in the AOT layout.
pack_kernels() {
  local staging
  staging=$(mktemp -d)
  for so in "$HOME"/.cache/flashinfer/*/*/cached_ops/*/*.so; do
    [ -f "$so" ] || continue
    name=$(basename "$(dirname "$so")")
    mkdir -p "$staging/$name" && cp "$so" "$staging/$name/"
  done
  if [ -n "$(ls "$staging")" ]; then tar -C "$staging" -czf "$OUT/kcache-built-here.tgz" . && ls -la "$OUT"; fi
}
if ls .gpu/kcache/fi-cache.tgz.* >/dev/null 2>&1; then bash .gpu/kernel-cache.sh unpack .gpu/kcache; fi
if [ "$mode" = peer ]; then
  nvidia-smi --query-gpu=name,uuid,memory.total,driver_version --format=csv,noheader
  restore_kernels "$VSITE"
  PYTHONPATH="$VSITE:$PWD" VLLM_ENABLE_V1_MULTIPROCESSING=0 timeout "${TIME_LIMIT}" python3 -m bench.peer_vllm "$@" 2>&1 \
    | tee "$OUT/peer.log"
  rc=${PIPESTATUS[0]}
  pack_kernels
  exit "$rc"
fi
source bench/gpu_site.sh
restore_kernels "$site"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
git status --short 2>/dev/null | head -20

rc=0
if [ "$mode" = test ] || [ "$mode" = all ]; then
  default_tests="tests/engine/test_gpu_attention.py tests/engine/test_gpu_model.py tests/engine/test_sampler.py
    tests/engine/test_gpu_rope_cache.py tests/engine/test_gpu_symm_all_reduce.py"
  # shellcheck disable=SC2086  # the lists are whitespace-separated paths
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -m gpu -s -p no:cacheprovider -rA \
    ${TESTS:-$default_tests} ${EXTRA_TESTS:-} 2>&1 | tee "$OUT/gpu-tests.log"
  rc=${PIPESTATUS[0]}
fi
if [ "$mode" = tp ]; then
  gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
  sizes=1,2
  [ "$gpus" -ge 4 ] && sizes=1,2,4
  echo "GPUs: $gpus -> tensor parallel sizes $sizes"
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}  # the TP control group (gloo) stays on this host
  # the symmetric-memory all-reduce is opt-in until measured on 2+ GPUs: measure it (KUBELLM_TP_SYMM_MEM=0: NCCL only)
  export KUBELLM_TP_SYMM_MEM=${KUBELLM_TP_SYMM_MEM:-1}
  echo "KUBELLM_TP_SYMM_MEM=$KUBELLM_TP_SYMM_MEM"
  if [ "${TP_TESTS:-1}" = 1 ]; then
    timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -m gpu -s -p no:cacheprovider -rs \
      tests/engine/test_gpu_symm_all_reduce.py tests/engine/test_gpu_tensor_parallel.py 2>&1 | tee "$OUT/gpu-tp-tests.log"
    rc=${PIPESTATUS[0]}
  fi
  left=$((TIME_LIMIT - SECONDS - 30))
  [ "${TP_BENCH:-1}" = 1 ] && python3 -m bench.offline --out-dir "$OUT" --deadline-s "$left" --tensor-parallel-size "$sizes" \
    --workloads d,a,b --decode-batches 1 --skip-hf --scale "${TP_SCALE:-0.5}" "$@" 2>&1 | tee "$OUT/bench-tp.log"
  rc=$((rc | PIPESTATUS[0]))
fi
if [ "$mode" = structured ]; then  # bench/structured.py: JSON schema vs unconstrained (needs llguidance in $WHEELS)
  timeout "$((TIME_LIMIT - SECONDS - 30))" python3 -m bench.structured --out-dir "$OUT" --vllm-site "$VSITE" \
    --peer-timeout-s "$(((TIME_LIMIT - SECONDS) * 6 / 10))" "$@" 2>&1 | tee "$OUT/structured.log"
  rc=$((rc | PIPESTATUS[0]))
fi
if [ "$mode" = structured-host ]; then  # bench/structured_host.py: the grammar's per-step host work, on this host's CPUs
  timeout "$((TIME_LIMIT - SECONDS - 30))" python3 -m bench.structured_host --out-dir "$OUT" "$@" 2>&1 \
    | tee "$OUT/structured-host.log"
  rc=$((rc | PIPESTATUS[0]))
fi
if [ "$mode" = mla-micro ]; then  # bench/mla_micro.py: MLA attention alone, decode and absorbed vs up-projected prefill
  timeout "$((TIME_LIMIT - SECONDS - 30))" python3 -m bench.mla_micro --out-dir "$OUT" \
    --deadline-s "$((TIME_LIMIT - SECONDS - 120))" "$@" 2>&1 | tee "$OUT/mla-micro.log"
  rc=$((rc | PIPESTATUS[0]))
fi
if [ "$mode" = startup ]; then  # bench/startup.py: both engines loading the same safetensors directory from disk
  df -h /tmp | tail -1
  VSITE="$VSITE" timeout "$((TIME_LIMIT - SECONDS - 10))" python3 -m bench.startup --dir /tmp/llama8b --out-dir "$OUT" \
    --deadline-s "$((TIME_LIMIT - SECONDS - 40))" "$@" 2>&1 | tee "$OUT/startup.log"
  rc=$((rc | PIPESTATUS[0]))
fi
if [ "$mode" = bench ] || [ "$mode" = all ]; then
  left=$((TIME_LIMIT - SECONDS - 30))
  python3 -m bench.offline --out-dir "$OUT" --deadline-s "$left" "$@" 2>&1 | tee "$OUT/bench.log"
  rc=$((rc | PIPESTATUS[0]))
fi

pack_kernels
exit "$rc"
