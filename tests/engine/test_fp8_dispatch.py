"""The FP8 GEMM dispatch (models/fp8_dispatch.py, fp8_gemm.plan_route) and the warm-up tuning's pure logic
(models/fp8_tune.py) on CPU: the table's figures are the named results file's, the routes chosen are the fastest
of those figures (worked out here by hand for the cases that decide batch-1 decode and prefill), every route
handed out is runnable (bf16-input kernels only up to 64 rows, _scaled_mm only where its rules allow, the split-K
kernel only while switched on), split-K tilings cover K in whole steps, and the tuner times the right keys and
keeps the fastest candidate that is correct. The timing itself is test_gpu_fp8_gemm.py's."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from kubellm.engine import loader as _loader_first  # noqa: F401 (loader before models: import cycle)
from kubellm.engine.config import EngineConfig
from kubellm.engine.models import fp8_dispatch, fp8_gemm, fp8_tune
from kubellm.engine.models.fp8_dispatch import (
    SCALED_MM_TENSOR,
    SCALED_MM_TOKEN,
    TRITON_GROUP,
    TRITON_TOKEN,
    W8A16,
    Route,
)

REPO = Path(__file__).resolve().parents[2]
COLUMNS = ["bf16", "tensor", "tensor-token", "tensor-w8a16", "channel", "block", "block-gemm", "block-w8a8",
           "block-w8a16", "tensor-triton", "flashinfer"]  # fmt: skip


@pytest.fixture(autouse=True)
def dispatch_state():
    """Each test starts from the table dispatch with split-K allowed and nothing tuned (the routes these tests
    check; the engine's default is "fixed"), and leaves the dispatch as it found it, for the tests after it."""
    with fp8_gemm.dispatch_settings("table", True, {}):
        yield


def test_the_table_holds_the_figures_of_the_results_file_it_names() -> None:
    text = (REPO / fp8_dispatch.SOURCE).read_text()
    rows = re.findall(r"^\| (qkv|o|gate_up|down) \| (\d+) \| (.*) \|$", text, flags=re.M)
    assert len(rows) == 28, "4 shapes x 7 batch sizes in the source"
    for shape, m, rest in rows:
        cells = [c.strip() for c in rest.split("|")][: len(COLUMNS)]
        i = fp8_dispatch.M_BUCKETS.index(int(m))
        for col, cell in zip(COLUMNS, cells, strict=True):
            if col not in fp8_dispatch.MEASURED_US[shape]:
                continue
            want = None if cell == "-" else float(cell.split()[0])
            assert fp8_dispatch.MEASURED_US[shape][col][i] == want, (shape, m, col)


def test_m_buckets_take_the_smallest_measured_batch_at_or_above_m() -> None:
    got = {m: fp8_dispatch.M_BUCKETS[fp8_dispatch.m_bucket(m)] for m in (1, 2, 7, 8, 16, 17, 64, 65, 512, 513, 9000)}
    assert got == {1: 1, 2: 7, 7: 7, 8: 16, 16: 16, 17: 64, 64: 64, 65: 512, 512: 512, 513: 2048, 9000: 8192}
    with pytest.raises(ValueError, match="rows must be >= 1"):
        fp8_dispatch.m_bucket(0)


def test_shape_classes_follow_the_aspect_ratio() -> None:
    llama = {(6144, 4096): "qkv", (4096, 4096): "o", (28672, 4096): "gate_up", (4096, 14336): "down"}
    assert {s: fp8_dispatch.shape_class(*s) for s in llama} == llama
    # Qwen3-30B-A3B: qkv N/K 2.5 (ln 0.92: qkv's ln 1.5 = 0.41 is nearer than gate_up's ln 7 = 1.95); o_proj N/K
    # 0.5 (ln -0.69: down's ln 0.286 = -1.25 is 0.56 away, o's 0 is 0.69 away)
    assert fp8_dispatch.shape_class(5120, 2048) == "qkv"
    assert fp8_dispatch.shape_class(2048, 4096) == "down"
    with pytest.raises(ValueError, match="N and K"):
        fp8_dispatch.shape_class(0, 4096)


def test_the_routes_chosen_are_the_fastest_measured() -> None:
    t = fp8_dispatch.table_route
    # batch-1 decode, per-tensor weights: per-token + row-wise _scaled_mm 12.7 / 11.8 / 34.0 us beat W8A16's 15.6 /
    # 13.8 / 46.2; for down W8A16's 31.6 beats 35.0
    assert [t("tensor", n, k, 1) for n, k in ((6144, 4096), (4096, 4096), (28672, 4096))] == [SCALED_MM_TOKEN] * 3
    assert t("tensor", 4096, 14336, 1) == W8A16
    # M 2..7 and 8..16: W8A16 for qkv (16.4 / 15.7 vs triton's 17.2 / 17.1 upper bound)
    assert t("tensor", 6144, 4096, 5) == W8A16 and t("tensor", 6144, 4096, 12) == W8A16
    # prefill, M = 2048, down: Triton 179.6 + quantization (394.8 - 378.4 = 16.4) = 196.0 < 222.7 (per-token
    # _scaled_mm) < 229.5 (per-tensor _scaled_mm)
    assert t("tensor", 4096, 14336, 2048) == TRITON_TOKEN
    # M = 8192, gate_up: per-token _scaled_mm 1662.9 < per-tensor 1791.2 < Triton 1981.4 + 38.5
    assert t("tensor", 28672, 4096, 8192) == SCALED_MM_TOKEN
    # M = 64, down: per-tensor _scaled_mm 31.3 < Triton 35.5 + 3.2
    assert t("tensor", 4096, 14336, 64) == SCALED_MM_TENSOR
    # block weights at M = 1: the W8A8 kernel with per-group inputs (18.9 / 19.2 / 49.0 / 48.0) beats W8A16
    # (19.8 / 21.0 / 52.3 / 54.4)
    for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)):
        assert t("block", n, k, 1) == TRITON_GROUP


def test_the_per_layer_estimate_at_batch_1() -> None:
    fixed, table = fp8_dispatch.layer_estimate("tensor", 0)
    assert fixed == pytest.approx(15.6 + 13.8 + 46.2 + 31.6)
    assert table == pytest.approx(12.7 + 11.8 + 34.0 + 31.6)
    assert "scaled_mm+token 12.7" in fp8_dispatch.report()


def test_the_fixed_dispatch_is_the_old_rule() -> None:
    for kind, above in (("tensor", SCALED_MM_TENSOR), ("channel", SCALED_MM_TOKEN), ("block", TRITON_GROUP)):
        assert fp8_dispatch.fixed_route(kind, 16) == W8A16
        assert fp8_dispatch.fixed_route(kind, 17) == above


def plan(kind: str, n: int, k: int, m: int, *, static: bool = False, dtype=torch.bfloat16, cuda: bool = True):
    return fp8_gemm.plan_route(kind, static, n, k, m, dtype, cuda)  # type: ignore[arg-type]


def test_plan_route_makes_every_route_runnable() -> None:
    assert plan("tensor", 6144, 4096, 1) == SCALED_MM_TOKEN
    assert plan("tensor", 6144, 4096, 1, cuda=False) == TRITON_TOKEN, "_scaled_mm needs CUDA tensors"
    assert plan("tensor", 6144, 4096, 1, dtype=torch.float16) == TRITON_TOKEN, "row-wise _scaled_mm: bf16 out only"
    assert plan("tensor", 6144, 4100, 1) == TRITON_TOKEN, "_scaled_mm needs K % 16 == 0"
    assert plan("tensor", 4096, 14336, 64, dtype=torch.float16) == SCALED_MM_TENSOR, "tensor-wise takes fp16"
    assert plan("block", 6144, 4096, 1) == TRITON_GROUP
    fp8_gemm.configure("fixed", True)
    assert plan("tensor", 6144, 4096, 1) == W8A16
    assert plan("tensor", 6144, 4096, 17) == SCALED_MM_TENSOR
    with pytest.raises(ValueError, match="fixed, table, tune"):
        fp8_gemm.configure("fastest", True)


def test_tuned_routes_serve_their_bucket_in_the_tune_mode_only() -> None:
    split = Route("splitk", "bf16", (32, 256, 3, 4, 3, False))
    fp8_gemm.set_tuned({fp8_gemm.dispatch_key("tensor", False, 6144, 4096, 1): split,
                        fp8_gemm.dispatch_key("tensor", False, 6144, 4096, 64): W8A16})  # fmt: skip
    assert plan("tensor", 6144, 4096, 1) == SCALED_MM_TOKEN, "table mode ignores tuned routes"
    fp8_gemm.configure("tune", True)
    assert plan("tensor", 6144, 4096, 1) == split
    assert plan("tensor", 6144, 4096, 40) == W8A16, "M 17..64 share the bucket"
    assert plan("tensor", 6144, 4096, 2) == W8A16, "another bucket: the table's route"
    assert plan("tensor", 6144, 4096, 1, static=True) == SCALED_MM_TOKEN, "a static input scale is another key"
    fp8_gemm.configure("tune", False)
    assert plan("tensor", 6144, 4096, 1) == W8A16, "the split-K kill switch puts W8A16 in its place"


def test_bf16_input_routes_never_take_more_than_64_rows() -> None:
    fp8_gemm.configure("tune", True)
    fp8_gemm.set_tuned({fp8_gemm.dispatch_key("channel", False, 4096, 4096, 100): W8A16})  # a corrupt entry
    assert plan("channel", 4096, 4096, 100) == SCALED_MM_TOKEN


def test_the_engine_setting_and_its_environment_variables(monkeypatch) -> None:
    assert EngineConfig().fp8_gemm == "fixed" and EngineConfig().fp8_splitk is True  # until the gpu tests ran
    monkeypatch.setenv("KUBELLM_FP8_GEMM", "tune")
    monkeypatch.setenv("KUBELLM_FP8_SPLITK", "0")
    assert EngineConfig().fp8_gemm == "tune" and EngineConfig().fp8_splitk is False


def test_splitk_tilings_cover_k_in_whole_steps() -> None:
    # qkv, M = 1, 132 SMs: 6144 / 32 = 192 column tiles; 4 x 132 = 528 programs wanted -> 3 splits;
    # 4096 / 3 = 1366 rounded up to whole 256-column steps = 1536 per split -> 3 splits
    c = fp8_gemm.splitk_config(1, 6144, 4096, "tensor", None, 132)
    assert (c.BLOCK_N, c.BLOCK_K, c.SPLIT_K, c.use_dot) == (32, 256, 3, False)
    # gate_up has 896 tiles already: one pass
    assert fp8_gemm.splitk_config(1, 28672, 4096, "tensor", None, 132).SPLIT_K == 1
    # down, 16 rows, tensor cores: 128 tiles -> 5 splits of 14336 / 5 = 2868 -> 2944 (23 x 128) -> 5
    c = fp8_gemm.splitk_config(16, 4096, 14336, "channel", None, 132)
    assert (c.BLOCK_K, c.SPLIT_K, c.use_dot) == (128, 5, True)
    # block scales: splits start on 128-column block edges and steps stay inside a block
    # (128 tiles -> 5 splits; 4096 / 5 = 820 -> 896 = 7 blocks per split, the last split 4 blocks)
    c = fp8_gemm.splitk_config(1, 4096, 4096, "block", (128, 128), 132)
    assert (c.BLOCK_K, c.SPLIT_K) == (128, 5)
    for m, k in ((1, 100), (3, 4096), (64, 2048)):
        c = fp8_gemm.splitk_config(m, 2048, k, "tensor", None, 132, split_k=1000)
        per = math.ceil(math.ceil(k / c.SPLIT_K) / c.BLOCK_K) * c.BLOCK_K
        assert (c.SPLIT_K - 1) * per < k <= c.SPLIT_K * per, (m, k, c)
    with pytest.raises(ValueError, match="1 to 64 rows"):
        fp8_gemm.splitk_config(65, 4096, 4096, "tensor", None, 132)
    with pytest.raises(ValueError, match="at most 4 rows"):
        fp8_gemm.splitk_config(5, 4096, 4096, "tensor", None, 132, use_dot=False)


def test_tuning_times_one_m_per_bucket_the_engine_reaches() -> None:
    assert fp8_tune.bucket_rows(8192) == [1, 7, 16, 64, 512, 2048, 8192]
    assert fp8_tune.bucket_rows(100) == [1, 7, 16, 64, 100]
    assert fp8_tune.bucket_rows(16384) == [1, 7, 16, 64, 512, 2048, 8192]
    assert fp8_tune.bucket_rows(1) == [1]
    layers = [("tensor", False, 6144, 4096)] * 32 + [("tensor", False, 4096, 14336)] * 32
    keys = fp8_tune.tune_keys(layers, 100)
    assert len(keys) == 2 * 5
    assert keys[fp8_tune.Key("tensor", False, 4096, 14336, 4)] == 100


def test_candidates_start_with_the_table_route_and_fit_the_format() -> None:
    key = fp8_tune.Key("tensor", False, 6144, 4096, 0)
    c = fp8_tune.candidates(key, 1, True, 132)
    assert c[0] == SCALED_MM_TOKEN and W8A16 in c and SCALED_MM_TENSOR in c and TRITON_TOKEN in c
    splits = [r for r in c if r.kernel == "splitk"]
    assert len(splits) >= 3 and len(set(splits)) == len(splits)
    assert not any(r.kernel == "splitk" for r in fp8_tune.candidates(key, 1, False, 132))
    big = fp8_tune.candidates(fp8_tune.Key("tensor", True, 6144, 4096, 5), 2048, True, 132)
    assert all(r.act != "bf16" for r in big) and SCALED_MM_TENSOR not in big, "static scales: no dynamic per-tensor"
    block = fp8_tune.candidates(fp8_tune.Key("block", False, 6144, 4096, 0), 1, True, 132)
    assert {r.kernel for r in block} == {"triton", "w8a16", "splitk"} and all(r.act in ("bf16", "group") for r in block)


def test_choose_keeps_the_fastest_correct_candidate() -> None:
    split = Route("splitk", "bf16", (32, 256, 3, 4, 3, False))
    results = {SCALED_MM_TOKEN: (12.0, 0.02), W8A16: (15.0, 0.001), split: (8.0, 0.002), TRITON_TOKEN: (None, None)}
    best, notes = fp8_tune.choose(SCALED_MM_TOKEN, results)
    assert best == split and any("failed" in n for n in notes)
    results[split] = (8.0, 0.3)  # wrong output: dropped however fast
    assert fp8_tune.choose(SCALED_MM_TOKEN, results)[0] == SCALED_MM_TOKEN
    results[split] = (8.0, float("nan"))
    assert fp8_tune.choose(SCALED_MM_TOKEN, results)[0] == SCALED_MM_TOKEN
    assert fp8_tune.choose(W8A16, {W8A16: (10.0, 0.0), split: (10.0, 0.0)})[0] == W8A16, "a tie keeps the table's"
    assert fp8_tune.choose(W8A16, {W8A16: (None, None)})[0] == W8A16, "nothing ran: the table's"
    assert fp8_tune.choose(W8A16, {W8A16: (10.0, 0.02)})[0] == W8A16, "W8A16's own output over 1%: still first"
