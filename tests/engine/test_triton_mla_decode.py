"""The Triton MLA decode kernel (engine/attention/triton_mla_decode.py) equals the torch reference on paged latent
pools, run under Triton's interpreter on CPU (bench/mla_decode_interpret_check.py: page sizes 16 and 64, 16 and 128
heads, ragged contexts with a row of context 1, contexts crossing split boundaries, empty splits, the one-split path
without a merge, float32 and bf16, queries in deepseek.py's strided layout, a plan into CUDA-graph page-table buffers).
Triton stays out of the venv (see test_triton_compile.py): the check runs in a subprocess with .venv/triton-3.6.0 on
its path. The split count and the wrapper's refusals need no Triton."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kubellm.engine import compile_check
from kubellm.engine.attention import triton_mla_decode as tmd
from kubellm.engine.attention.mla import MLAPageTable

REPO = Path(__file__).resolve().parents[2]
TRITON_DIR = Path(
    os.environ.get("KUBELLM_TRITON_CHECK_PATH", Path(sys.prefix) / f"triton-{compile_check.TRITON_VERSION}")
)


def test_kernel_matches_the_torch_reference_under_the_interpreter() -> None:
    if not (TRITON_DIR / "triton").is_dir():
        pytest.fail(f"triton not found in {TRITON_DIR}: run `make triton` (or set KUBELLM_TRITON_CHECK_PATH)")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_CACHE_DIR")}
    env["PYTHONPATH"] = str(TRITON_DIR)
    done = subprocess.run(
        [sys.executable, "-m", "bench.mla_decode_interpret_check"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("mla_decode ")]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(lines) == 9 and all(line.endswith(" ok") for line in lines), lines
    assert "all checks passed" in done.stdout


def test_split_count_fills_the_sms_and_depends_on_the_batch_size_only() -> None:
    # DeepSeek-V2-Lite (16 heads: one head group) on 132 SMs: 2 x 132 programs wanted
    assert tmd.decode_splits(1, 16, 132) == tmd.MAX_SPLITS == 64, "capped"
    assert tmd.decode_splits(64, 16, 132) == 5  # ceil(264 / 64)
    assert tmd.decode_splits(256, 16, 132) == 2
    assert tmd.decode_splits(512, 16, 132) == 1, "enough rows: one split, no merge"
    assert tmd.decode_splits(8, 128, 132) == 5, "V3: 8 head groups a row, ceil(264 / 64)"
    assert tmd.decode_splits(4, 8, 132) == 64, "a TP shard of 8 heads is one (padded) group"


def test_the_wrapper_takes_decode_only_tables_and_checks_its_graph_buffers() -> None:
    w = tmd.TritonMLADecode(16, 0.1, torch.device("cpu"), num_sms=132)
    mixed = MLAPageTable(
        np.array([0, 3, 4], np.int32),
        np.array([0, 1, 2], np.int32),
        np.array([5, 6], np.int32),
        np.array([3, 9], np.int32),
    )
    with pytest.raises(ValueError, match="decode-only"):
        w.plan(mixed)
    decode = MLAPageTable(
        np.array([0, 1, 2], np.int32), np.array([0, 1, 3], np.int32), np.array([5, 6, 7], np.int32),
        np.array([3, 17], np.int32),
    )  # fmt: skip
    w.plan(decode)
    assert w._table is not None and [t.tolist() for t in w._table] == [[0, 1, 3], [5, 6, 7], [3, 17]]
    bufs = tmd.PageTableBuffers.allocate(4, 8, torch.device("cpu"))
    g = tmd.TritonMLADecode(16, 0.1, torch.device("cpu"), num_sms=132, buffers=bufs)
    g.plan(decode)
    assert bufs.kv_indptr[:3].tolist() == [0, 1, 3] and bufs.kv_lens[:2].tolist() == [3, 17]
    assert bufs.kv_indices[:3].tolist() == [5, 6, 7]
    small = tmd.TritonMLADecode(
        16, 0.1, torch.device("cpu"), num_sms=132, buffers=tmd.PageTableBuffers.allocate(4, 2, torch.device("cpu"))
    )
    with pytest.raises(ValueError, match="exceed the CUDA-graph page-table buffers"):
        small.plan(decode)
