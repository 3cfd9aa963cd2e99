#!/usr/bin/env bash
# On the GPU machine, in the call that carried one of bench/gpu_prepare.sh's transfer folders (.gpu/v0 .. .gpu/v4):
# move what arrived out of the working tree (the next call's tree replaces it) into /tmp/pieces (vLLM's pieces) and
# /tmp/whl (flashinfer's wheels); once every piece is there, install vLLM 0.26.0 into /tmp/vsite.
set -euo pipefail
mkdir -p /tmp/pieces /tmp/whl
for d in .gpu/v0 .gpu/v1 .gpu/v2 .gpu/v3 .gpu/v4; do
  [ -d "$d" ] || continue
  for f in "$d"/*; do
    [ -e "$f" ] || continue
    case $f in *.whl) mv "$f" /tmp/whl/ ;; *) mv "$f" /tmp/pieces/ ;; esac
  done
done
ls -la /tmp/pieces /tmp/whl
if [ -f /tmp/pieces/SHA256SUMS ] && [ -f /tmp/pieces/vllm-install.sh ]; then
  # every piece named in SHA256SUMS present: install (vllm-install.sh checks the sums itself)
  if awk '{print $2}' /tmp/pieces/SHA256SUMS | sed 's#^\./##' | while read -r p; do [ -f "/tmp/pieces/$p" ] || exit 1; done; then
    bash /tmp/pieces/vllm-install.sh /tmp/pieces /tmp/whl
  else
    echo "vLLM pieces still missing: $(awk '{print $2}' /tmp/pieces/SHA256SUMS | sed 's#^\./##' | while read -r p; do [ -f "/tmp/pieces/$p" ] || printf '%s ' "$p"; done)"
  fi
fi
