"""The split-K small-M FP8 kernel (fp8_gemm.splitk) computes x @ dequant(W)^T: run under Triton's interpreter on
CPU (bench/fp8_interpret_check.py, whose patches make the interpreter's float conversions and bf16 dot products the
GPU's) against the dequantized weight in float64, for the three scale layouts, one row on CUDA cores (split over
K and not), three rows on CUDA cores and 16 rows on tensor cores, on Llama-3.1-8B's deepest K (down_proj, 14336)
and Qwen3-30B-A3B's qkv (K 2048), N cut to 72 columns (ragged against the 32-column tiles). Triton stays out of the
venv (see test_triton_compile.py): the check runs in a subprocess with .venv/triton-3.6.0 on its path. ~1 minute
on 2 cores, hence `slow`; the full shapes: `python -m bench.fp8_interpret_check --only splitk`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubellm.engine import compile_check

REPO = Path(__file__).resolve().parents[2]
TRITON_DIR = Path(
    os.environ.get("KUBELLM_TRITON_CHECK_PATH", Path(sys.prefix) / f"triton-{compile_check.TRITON_VERSION}")
)


@pytest.mark.slow
def test_splitk_matches_the_dequantized_product_under_the_interpreter() -> None:
    if not (TRITON_DIR / "triton").is_dir():
        pytest.fail(f"triton not found in {TRITON_DIR}: run `make triton` (or set KUBELLM_TRITON_CHECK_PATH)")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_CACHE_DIR")}
    env["PYTHONPATH"] = str(TRITON_DIR)
    done = subprocess.run(
        [sys.executable, "-m", "bench.fp8_interpret_check", "--only", "splitk", "--quick"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("splitk ")]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(lines) == 2 * 3 * 3, "two shapes x three formats x three cases"
    assert all(line.endswith("ok") for line in lines)
    assert "all checks passed" in done.stdout
