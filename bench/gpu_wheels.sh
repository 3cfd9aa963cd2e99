#!/usr/bin/env bash
# Download, here, the wheels our engine needs on a bare GPU machine beyond what its image has (Python 3.12, torch,
# transformers, triton; no network there): llguidance, pydantic (+ its core and helpers), gguf and orjson. Seen missing on
# an H100 on 2026-12-07: pydantic, gguf, orjson. Run after shared/gpu/wheels.sh filled the same folder with flashinfer's.
#   bash bench/gpu_wheels.sh .gpu/whl
set -euo pipefail
dir=${1:?usage: gpu_wheels.sh DIR}
mkdir -p "$dir"
py=${PYTHON:-.venv/bin/python}
version() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$dir" \
  "llguidance==$(version llguidance)" "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)" \
  annotated-types typing-inspection "gguf==$(version gguf)" "orjson==$(version orjson)"
ls "$dir"
