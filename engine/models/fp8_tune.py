"""Warm-up choice of the FP8 GEMM route (KUBELLM_FP8_GEMM=tune): before CUDA-graph capture, time the candidate
routes once per distinct (weight format, static input scale or not, weight shape, M bucket) on the GPU the engine
runs on, and keep the fastest whose output agrees with the dequantized reference.

Why: bench/fp8_micro.py's table (models/fp8_dispatch.py) was measured on one H200 with Llama-8B shapes, its figures
vary by up to 40% between two samples of the same route, and the split-K kernel has never been timed; another GPU,
shape or tensor-parallel shard may rank the routes differently. Timing here costs start-up seconds, bounded by
`budget_s` (the routes not reached keep the table's), logged with every choice.

Start-up cost, estimated (not yet measured): Llama-3.1-8B at a 16384-token budget has 28 keys (4 shapes x 7 buckets)
and 148 candidate timings; their products take ~0.45 s of GPU time (the source table's figures x 26 products each);
first-use Triton builds of ~21 distinct kernel specialisations (split-K variants, W8A8 tiles, quantization kernels,
~1-3 s each on the GPU host) dominate: ~20-60 s with a cold Triton cache, a few seconds with a warm one, capped by
BUDGET_S either way (the small-M keys, timed first, are the ones that matter for decode).

Split: `candidates`, `tune_keys` and `choose` are pure (CPU-tested); `tune` does the timing on CUDA (a gpu test).
Each timing is a CUDA graph of up to LAYERS products over distinct layers' weights of that shape (so weights stream
from memory as in the model, not from L2), replayed REPS times, divided per product.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from . import fp8_dispatch, fp8_gemm
from .fp8_dispatch import M_BUCKETS, SCALED_MM_TENSOR, SCALED_MM_TOKEN, TRITON_GROUP, TRITON_TOKEN, W8A16, Route

logger = logging.getLogger(__name__)

LAYERS, REPS = 4, 5
BUDGET_S = 60.0  # start-up time the timing may take (first-use Triton builds included)
# A candidate whose output is further than this from the dequantized float32 product (relative L2 over the whole
# output) is dropped: bf16-input routes only round the output (~2^-9); W8A8 routes also quantize the input to e4m3
# (3 mantissa bits: ~2-3% of the input, averaging to ~1-2% of an output over K = thousands of products).
TOL_BF16_INPUT, TOL_W8A8 = 0.01, 0.05


@dataclass(frozen=True)
class Key:
    kind: str  # tensor / channel / block
    static: bool  # a static input scale
    n: int
    k: int
    bucket: int  # index into M_BUCKETS

    def as_dispatch_key(self) -> tuple:
        return (self.kind, self.static, self.n, self.k, self.bucket)


def bucket_rows(max_rows: int) -> list[int]:
    """One M per bucket an engine of at most `max_rows` rows a forward reaches: the bucket's bound, or max_rows for
    the bucket holding it."""
    if max_rows < 1:
        raise ValueError(f"bucket_rows: max_rows must be >= 1, got {max_rows}")
    return [min(b, max_rows) for i, b in enumerate(M_BUCKETS) if i == 0 or M_BUCKETS[i - 1] < max_rows]


def tune_keys(layers: Iterable[tuple[str, bool, int, int]], max_rows: int) -> dict[Key, int]:
    """Distinct keys over the model's FP8 layers (kind, static, N, K) and the buckets up to max_rows -> the M to
    time each at."""
    out: dict[Key, int] = {}
    shapes = sorted(set(layers))
    for m in bucket_rows(max_rows):
        for kind, static, n, k in shapes:
            out.setdefault(Key(kind, static, n, k, fp8_dispatch.m_bucket(m)), m)
    return out


def candidates(key: Key, m: int, splitk: bool, sms: int) -> list[Route]:
    """Routes worth timing for `key` at M rows, the table's first (it wins ties): bf16-input kernels up to
    W8A16_MAX_ROWS (W8A16; split-K at its default split, half and double that, and on CUDA cores for 1 row), and
    the format's W8A8 routes (per-tensor weights also with per-tensor dynamic inputs)."""
    kind = key.kind
    table = fp8_dispatch.table_route(kind, key.n, key.k, m)  # type: ignore[arg-type]
    out: list[Route] = [table]
    if m <= fp8_gemm.W8A16_MAX_ROWS:
        out.append(W8A16)
        if splitk:
            block = (128, 128) if kind == "block" else None
            base = fp8_gemm.splitk_config(m, key.n, key.k, kind, block, sms)  # type: ignore[arg-type]
            variants = [base]
            for split in (max(1, base.SPLIT_K // 2), base.SPLIT_K * 2):
                variants.append(
                    fp8_gemm.splitk_config(m, key.n, key.k, kind, block, sms, split_k=split, use_dot=base.use_dot)  # type: ignore[arg-type]
                )
            if m == 1:
                variants.append(fp8_gemm.splitk_config(m, key.n, key.k, kind, block, sms, use_dot=not base.use_dot))  # type: ignore[arg-type]
            for v in variants:
                out.append(Route("splitk", "bf16", (v.BLOCK_N, v.BLOCK_K, v.SPLIT_K, v.num_warps, v.num_stages,
                                                    v.use_dot)))  # fmt: skip
    if kind == "block":
        out.append(TRITON_GROUP)
    else:
        out += [SCALED_MM_TOKEN, TRITON_TOKEN]
        if kind == "tensor" and not key.static:
            out.append(SCALED_MM_TENSOR)
    seen: set[Route] = set()
    return [r for r in out if not (r in seen or seen.add(r))]  # type: ignore[func-returns-value]


def tolerance(route: Route) -> float:
    return TOL_BF16_INPUT if route.act == "bf16" else TOL_W8A8


def choose(first: Route, results: dict[Route, tuple[float | None, float | None]]) -> tuple[Route, list[str]]:
    """The fastest route whose error is within its tolerance. results: route -> (us per product or None when it
    failed to run, relative error or None). Returns (route, notes on dropped candidates); `first` (the table's)
    when none qualifies or on a tie."""
    notes, ok = [], {}
    for r, (us, err) in results.items():
        if us is None:
            notes.append(f"{r} failed to run")
        elif err is None or err != err or err > tolerance(r):  # NaN included
            notes.append(f"{r} dropped: error {err} > {tolerance(r)}")
        else:
            ok[r] = us
    if not ok:
        return first, notes
    best = min(ok, key=lambda r: (ok[r], r != first))
    if first in ok and ok[first] <= ok[best]:
        best = first
    return best, notes


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    diff = (got.float() - want.float()).norm()
    return float(diff / want.float().norm().clamp_min(1e-30))


def _graph_us(fn: Callable[[], None], reps: int, products: int) -> float:
    """us per product: `fn` (products GEMMs) captured once in a CUDA graph, replayed `reps` times."""
    fn()  # builds and first-use work outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    del graph
    return start.elapsed_time(end) * 1e3 / (reps * products)


@dataclass
class Fp8Layer:
    """One FP8 linear layer's operands, as fp8_linear takes them."""

    weight: torch.Tensor
    scale: torch.Tensor
    block_size: tuple[int, int] | None
    input_scale: torch.Tensor | None

    @property
    def key_parts(self) -> tuple[str, bool, int, int]:
        kind = fp8_gemm.scale_kind(self.weight, self.scale, self.block_size)
        return kind, self.input_scale is not None, self.weight.shape[0], self.weight.shape[1]


@torch.inference_mode()
def tune(
    layers: list[Fp8Layer], max_rows: int, dtype: torch.dtype, *, splitk: bool = True, budget_s: float = BUDGET_S,
    seed: int = 0,
) -> dict[tuple, Route]:  # fmt: skip
    """Time the candidates of every key of `layers` (CUDA) and return dispatch_key -> chosen route for
    fp8_gemm.set_tuned. Keys not reached within budget_s are left out (the table's routes serve them)."""
    started = time.perf_counter()
    by_shape: dict[tuple, list[Fp8Layer]] = {}
    for layer in layers:
        by_shape.setdefault(layer.key_parts, []).append(layer)
    keys = tune_keys(by_shape, max_rows)
    sms = fp8_gemm.sm_count(layers[0].weight.device) if layers else 0
    gen = torch.Generator(device=layers[0].weight.device).manual_seed(seed) if layers else None
    chosen: dict[tuple, Route] = {}
    skipped = 0
    for key, m in keys.items():
        if time.perf_counter() - started > budget_s:
            skipped += 1
            continue
        group = by_shape[(key.kind, key.static, key.n, key.k)][:LAYERS]
        dev = group[0].weight.device
        x = torch.randn(m, key.k, generator=gen, device=dev).to(dtype)
        ref = fp8_gemm.fp8_linear_reference(x, group[0].weight, group[0].scale, block_size=group[0].block_size,
                                            out_dtype=torch.float32)  # fmt: skip
        results: dict[Route, tuple[float | None, float | None]] = {}
        cands = candidates(key, m, splitk, sms)
        for r in cands:
            results[r] = _measure(r, x, group, key.kind, dtype, ref)
        best, notes = choose(cands[0], results)
        chosen[key.as_dispatch_key()] = best
        timing = ", ".join(f"{r} {us:.1f}" for r, (us, _) in results.items() if us is not None)
        logger.info(
            "FP8 GEMM tune: %s [%d, %d]%s M=%d (bucket <= %d): %s (table: %s); us per product: %s%s",
            key.kind, key.n, key.k, " static" if key.static else "", m, M_BUCKETS[key.bucket], best, cands[0],
            timing, ("; " + "; ".join(notes)) if notes else "",
        )  # fmt: skip
    torch.cuda.empty_cache()  # the references, outputs and graph pools of the timing
    logger.info(
        "FP8 GEMM tune: %d of %d (format, shape, M bucket) keys timed in %.1f s%s",
        len(chosen), len(keys), time.perf_counter() - started,
        f"; {skipped} past the {budget_s:.0f} s budget keep the table's routes" if skipped else "",
    )  # fmt: skip
    return chosen


def _measure(
    r: Route, x: torch.Tensor, group: list[Fp8Layer], kind: str, dtype: torch.dtype, ref: torch.Tensor
) -> tuple[float | None, float | None]:
    """(us per product, relative error of the first layer's output) of route r; (None, None) when it cannot run."""

    def run_one(layer: Fp8Layer) -> torch.Tensor:
        return fp8_gemm.run_route(r, x, layer.weight, layer.scale, kind, layer.block_size, layer.input_scale, dtype)  # type: ignore[arg-type]

    try:
        err = relative_error(run_one(group[0]), ref)
        us = _graph_us(lambda: [run_one(layer) for layer in group], REPS, len(group))
    except Exception as e:  # a route this GPU or shape cannot run (build failure, resources) just loses
        logger.warning("FP8 GEMM tune: %s could not run on [%d, %d] M=%d: %s: %s", r, group[0].weight.shape[0],
                       group[0].weight.shape[1], x.shape[0], type(e).__name__, str(e).splitlines()[0][:200]
                       if str(e) else "")  # fmt: skip
        return None, None
    return us, err


def startup_estimate_s(keys: dict[Key, int], per_layer_us: Callable[[Key, int], float], n_candidates: int) -> float:
    """Seconds of GPU time the timing takes (builds excluded): per key, candidates x (REPS + 2) x LAYERS products."""
    return sum(per_layer_us(k, m) for k, m in keys.items()) * n_candidates * (REPS + 2) * LAYERS * 1e-6
