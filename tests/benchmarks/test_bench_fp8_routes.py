"""bench.offline names the FP8 GEMM routes (KUBELLM_FP8_GEMM / KUBELLM_FP8_SPLITK) of a quantized run in its report,
so a next lease's table / tune / fixed runs are told apart; runs from before the setting render as they did."""

from __future__ import annotations

import json
from pathlib import Path

from bench.offline import results_markdown

RESULT = Path(__file__).parents[2] / "bench/results/engine-gpu-2026-12-07-llama-3.1-8b-fp8-h200-side-by-side.json"


def test_a_quantized_run_names_its_fp8_routes() -> None:
    r = json.loads(RESULT.read_text())
    assert "KUBELLM_FP8_GEMM" not in results_markdown(r), "that run predates the setting: nothing claimed"
    r["fp8_gemm"], r["fp8_splitk"] = "tune", False
    assert "FP8 GEMM routes: KUBELLM_FP8_GEMM=tune, KUBELLM_FP8_SPLITK=0." in results_markdown(r)
    r["settings"]["quantization"] = None  # a bf16 run: its FP8 setting is irrelevant
    assert "KUBELLM_FP8_GEMM" not in results_markdown(r)
