#!/usr/bin/env bash
# Here, before a GPU lease, in a fresh checkout (.gpu/ is ignored and does not survive a session's end): everything a
# bare GPU machine needs, in one command, ~2 minutes (PyPI downloads):
#   .gpu/whl                    flashinfer's wheels (shared/gpu/wheels.sh) and ours the image lacks (bench/gpu_wheels.sh)
#   .gpu/smollm2-tokenizer.json the structured-output benchmark's tokenizer (bench/structured.py --dump-tokenizer)
#   .gpu/v0 .. .gpu/v4          vLLM 0.26.0 (shared/gpu/vllm-carry.sh) laid out as five transfers of <= 58 MB, one call each
#   .gpu/kcache .gpu/tcache     empty until a lease brings back built flashinfer kernels / a Triton cache to keep
# Then, on the device, one call per transfer folder while the machine stays warm (30 s idle), each carrying ONLY that
# folder (`carry: [".gpu/vN"]`) and running `bash bench/gpu_transfer.sh`; the call carrying .gpu/v4 installs vLLM into
# /tmp/vsite. Later calls carry .gpu/whl (and .gpu/smollm2-tokenizer.json) and run bench/gpu_run.sh with
# WHEELS=.gpu/whl KUBELLM_GIT_COMMIT=<main's hash>.
#   bash bench/gpu_prepare.sh [SHARED]     (SHARED: the folder holding gpu/wheels.sh etc., default ../shared)
set -euo pipefail
shared=${1:-../shared}
[ -x .venv/bin/python ] || { echo "gpu_prepare.sh: run make install first (bench/gpu_wheels.sh reads versions from .venv)"; exit 1; }
mkdir -p .gpu/kcache .gpu/tcache
bash "$shared/gpu/wheels.sh" .gpu/whl
bash bench/gpu_wheels.sh .gpu/whl
[ -f .gpu/smollm2-tokenizer.json ] || .venv/bin/python -m bench.structured --dump-tokenizer .gpu/smollm2-tokenizer.json
[ -f .gpu/vllm/pieces/SHA256SUMS ] || bash "$shared/gpu/vllm-carry.sh" .gpu/vllm
pieces=.gpu/vllm/pieces
rm -rf .gpu/v0 .gpu/v1 .gpu/v2 .gpu/v3 .gpu/v4 && mkdir -p .gpu/v0 .gpu/v1 .gpu/v2 .gpu/v3 .gpu/v4
# Hard links: the pieces are not copied again. vllm-install.sh wants flashinfer's three wheels beside the pieces' folder.
ln -f "$pieces"/vllm-site.tar.gz.part-00 .gpu/v0/
ln -f "$pieces"/vllm-site.tar.gz.part-01 .gpu/v1/
ln -f "$pieces"/vllm-site.tar.gz.part-02 .gpu/whl/apache_tvm_ffi-*.whl .gpu/whl/nvidia_cudnn_frontend-*.whl .gpu/v2/
ln -f "$pieces"/vllm-deps.tar.part-00 .gpu/v3/
ln -f "$pieces"/vllm-deps.tar.part-01 "$pieces"/SHA256SUMS .gpu/whl/flashinfer_python-*.whl .gpu/v4/
cp "$pieces"/vllm-install.sh .gpu/v4/
ls "$pieces" | grep -q '^vllm-deps.tar.part-02$' && { echo "gpu_prepare.sh: vLLM's pieces grew to a sixth; lay it out by hand"; exit 1; }
du -sh .gpu/whl .gpu/v0 .gpu/v1 .gpu/v2 .gpu/v3 .gpu/v4 .gpu/smollm2-tokenizer.json
