"""Which FP8 GEMM path a dense linear layer takes, per (weight format, shape class, M bucket): the measured data and
the choice made from it, in one place. Pure Python (no torch): models/fp8_gemm.py asks `table_route` per call.

Source: bench/results/fp8-micro-2026-12-07-h200.md (bench/fp8_micro.py on one H200, commit e8397de; Llama-3.1-8B
shapes, each figure a CUDA graph of 4 distinct-weight products, us per product). MEASURED_US below is that file's
columns. Columns and the routes they time:
  tensor-w8a16   w8a16 (bf16 rows times FP8 weights, no activation quantization), per-tensor weight
  tensor         above M = 16 (GEMV_MAX_ROWS then): dynamic per-tensor quantization + tensor-wise _scaled_mm; at
                 M <= 16 it timed the w8a16 route again (a second sample of it, not used here)
  tensor-token   per-token quantization + row-wise _scaled_mm (the same cuBLAS kernel per-channel weights take)
  channel        per-channel weight: w8a16 at M <= 16, per-token + row-wise _scaled_mm above
  tensor-triton  our Triton W8A8 kernel, per-tensor scales, on an input quantized OUTSIDE the timing (M > 16 only)
  block-gemm     the Triton W8A8 kernel with 128x128 block scales, input quantized outside the timing
  block-w8a8     the same with the per-group quantization inside the timing
  block-w8a16    w8a16 with block scales
Estimates for routes no column times exactly (named `proxy` where used):
  triton + per-token input = tensor-triton + the quantization's cost, that cost taken as block-w8a8 - block-gemm
  (the per-group quantization kernel, one launch over the same bf16 rows as the per-token one); at M <= 16, where
  tensor-triton was not run, block-w8a8 itself (the same kernel and tile with block scaling added: an upper bound).
  Static per-tensor input scales (checkpoints with input_scale): the dynamic per-tensor format's figures, the
  dynamic quantization's extra launch not subtracted.
The figures are noisy: the same route measured twice in that run differs by up to 40% (down, M = 1: tensor 44.1 vs
tensor-w8a16 31.6 us; qkv w8a16 M = 1: 15.6 in the table vs 23.5 in the tile sweep). A choice between routes within
~10% of each other is a coin toss; the engine's warm-up tuning (fp8_tune.py, KUBELLM_FP8_GEMM=tune) times the
candidates on the GPU it runs on.

Shape classes: a layer is classed with the measured Llama-8B shape nearest in log(N / K) (qkv 1.5, o 1.0, gate_up
7.0, down 0.29); M buckets: the measured batch sizes, an M taking the smallest bucket >= M (the last is open).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

SOURCE = "bench/results/fp8-micro-2026-12-07-h200.md"
M_BUCKETS = (1, 7, 16, 64, 512, 2048, 8192)
SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}  # (K, N)
W8A16_MAX_ROWS = 64  # fp8_gemm.W8A16_MAX_ROWS: the most rows the bf16-input kernels (w8a16, splitk) hold
FIXED_W8A16_ROWS = 16  # fp8_gemm.GEMV_MAX_ROWS: the fixed (pre-table) dispatch's w8a16 bound

# us per product by column, one figure per M_BUCKETS entry (None: not run at that M)
MEASURED_US: dict[str, dict[str, tuple[float | None, ...]]] = {
    "qkv": {
        "tensor": (15.5, 16.4, 15.7, 17.6, 31.1, 96.0, 369.3),
        "tensor-token": (12.7, 23.6, 23.0, 19.6, 33.1, 92.4, 371.8),
        "tensor-w8a16": (15.6, 16.4, 15.7, 27.3, None, None, None),
        "channel": (15.8, 16.8, 16.0, 18.0, 31.4, 90.1, 373.8),
        "block-gemm": (17.6, 15.4, 15.4, 16.7, 58.2, 168.6, 686.5),
        "block-w8a8": (18.9, 17.2, 17.1, 18.4, 61.6, 178.3, 721.0),
        "block-w8a16": (19.8, 19.0, 18.8, 42.2, None, None, None),
        "tensor-triton": (None, None, None, 14.0, 26.0, 82.4, 334.2),
    },
    "o": {
        "tensor": (13.9, 16.4, 12.5, 15.5, 24.0, 70.9, 260.0),
        "tensor-token": (11.8, 22.9, 19.2, 19.0, 21.5, 67.6, 249.7),
        "tensor-w8a16": (13.8, 14.0, 12.0, 21.4, None, None, None),
        "channel": (14.2, 16.3, 12.1, 17.2, 19.8, 65.3, 248.5),
        "block-gemm": (17.4, 14.8, 14.9, 15.9, 30.5, 114.2, 460.9),
        "block-w8a8": (19.2, 16.6, 16.7, 17.6, 33.8, 124.0, 483.6),
        "block-w8a16": (21.0, 16.8, 16.2, 22.2, None, None, None),
        "tensor-triton": (None, None, None, 12.7, 20.2, 54.6, 219.0),
    },
    "gate_up": {
        "tensor": (47.4, 49.2, 44.8, 43.8, 103.5, 401.0, 1791.2),
        "tensor-token": (34.0, 53.5, 49.8, 49.0, 104.3, 428.9, 1662.9),
        "tensor-w8a16": (46.2, 47.1, 44.8, 99.0, None, None, None),
        "channel": (46.6, 47.3, 44.8, 47.2, 103.5, 424.1, 1742.3),
        "block-gemm": (46.7, 39.7, 33.6, 47.2, 203.1, 799.3, 3197.3),
        "block-w8a8": (49.0, 42.0, 35.6, 49.3, 207.0, 810.2, 3235.8),
        "block-w8a16": (52.3, 48.9, 48.6, 144.7, None, None, None),
        "tensor-triton": (None, None, None, 38.9, 103.8, 385.4, 1981.4),
    },
    "down": {
        "tensor": (44.1, 39.0, 32.0, 31.3, 59.3, 229.5, 905.6),
        "tensor-token": (35.0, 50.6, 49.9, 48.3, 57.3, 222.7, 896.6),
        "tensor-w8a16": (31.6, 39.3, 32.1, 72.6, None, None, None),
        "channel": (44.8, 38.0, 31.6, 46.6, 56.0, 227.0, 897.6),
        "block-gemm": (47.5, 44.9, 43.9, 46.0, 93.3, 378.4, 1602.3),
        "block-w8a8": (48.0, 47.3, 46.1, 49.2, 102.6, 394.8, 1695.5),
        "block-w8a16": (54.4, 52.0, 48.7, 75.9, None, None, None),
        "tensor-triton": (None, None, None, 35.5, 57.9, 179.6, 806.3),
    },
}

# The Triton W8A8 kernel's tile (BLOCK_M, BLOCK_N, GROUP_M, warps, stages) for block-scaled weights above 256 rows:
# the source's tile sweep, qkv and down at M = 512 and 8192, found (64, 128, 8, 4, 3) fastest or within 1% of it in
# all four (45.9 vs 57.6, 602 vs 672, 78.2 vs 92.0, 1418 vs 1484 us for the default (128, 128, 8, 8, 3)).
BLOCK_W8A8_TILE_ABOVE_256 = (64, 128, 8, 4, 3)

Format = Literal["tensor", "channel", "block"]  # the weight's scales (a static input scale is a flag beside it)
Kernel = Literal["w8a16", "splitk", "scaled_mm", "triton"]
Act = Literal["bf16", "tensor", "token", "group"]  # bf16: the kernel reads the unquantized rows


@dataclass(frozen=True)
class Route:
    """A GEMM path: the kernel and how its input is quantized (a static input scale overrides `act` to that scale
    for the W8A8 kernels)."""

    kernel: Kernel
    act: Act
    tile: tuple[int, ...] | None = None  # a tuned tiling (split-K: fp8_gemm.SplitKConfig's fields); None: default

    def __str__(self) -> str:
        name = self.kernel if self.act == "bf16" else f"{self.kernel}+{self.act}"
        return name if self.tile is None else f"{name}{list(self.tile)}"


W8A16 = Route("w8a16", "bf16")
SPLITK = Route("splitk", "bf16")
SCALED_MM_TENSOR = Route("scaled_mm", "tensor")
SCALED_MM_TOKEN = Route("scaled_mm", "token")
TRITON_TOKEN = Route("triton", "token")
TRITON_GROUP = Route("triton", "group")


def m_bucket(m: int) -> int:
    """Index into M_BUCKETS of the smallest bucket >= m (the last bucket for anything larger)."""
    if m < 1:
        raise ValueError(f"m_bucket: rows must be >= 1, got {m}")
    for i, b in enumerate(M_BUCKETS):
        if m <= b:
            return i
    return len(M_BUCKETS) - 1


def shape_class(n: int, k: int) -> str:
    """The measured shape whose log aspect ratio log(N / K) is nearest this layer's."""
    if n < 1 or k < 1:
        raise ValueError(f"shape_class: N and K must be >= 1, got N={n}, K={k}")
    r = math.log(n / k)
    return min(SHAPES, key=lambda s: abs(math.log(SHAPES[s][1] / SHAPES[s][0]) - r))


def _col(shape: str, column: str, i: int) -> float | None:
    return MEASURED_US[shape][column][i]


def _quant_us(shape: str, i: int) -> float:
    g, w = _col(shape, "block-gemm", i), _col(shape, "block-w8a8", i)
    return max(0.0, w - g) if g is not None and w is not None else 0.0


def _triton_token_us(shape: str, i: int) -> float | None:
    t = _col(shape, "tensor-triton", i)
    if t is not None:
        return t + _quant_us(shape, i)
    return _col(shape, "block-w8a8", i) if M_BUCKETS[i] <= FIXED_W8A16_ROWS else None


def estimates(fmt: Format, shape: str, i: int) -> dict[Route, float]:
    """Route -> us per product from the source's columns (see the module doc for proxies), for weight format `fmt`
    on measured shape `shape` at bucket index `i`. Routes with no figure are left out."""
    m = M_BUCKETS[i]
    if fmt == "block":
        out = {W8A16: _col(shape, "block-w8a16", i), TRITON_GROUP: _col(shape, "block-w8a8", i)}
    elif fmt == "channel":
        out = {
            W8A16: _col(shape, "channel" if m <= FIXED_W8A16_ROWS else "tensor-w8a16", i),
            SCALED_MM_TOKEN: _col(shape, "channel" if m > FIXED_W8A16_ROWS else "tensor-token", i),
            TRITON_TOKEN: _triton_token_us(shape, i),
        }
    elif fmt == "tensor":
        out = {
            W8A16: _col(shape, "tensor-w8a16", i),
            SCALED_MM_TENSOR: _col(shape, "tensor", i) if m > FIXED_W8A16_ROWS else None,
            SCALED_MM_TOKEN: _col(shape, "tensor-token", i),
            TRITON_TOKEN: _triton_token_us(shape, i),
        }
    else:
        raise ValueError(f"estimates: unknown weight format {fmt!r} (tensor, channel or block)")
    if m > W8A16_MAX_ROWS:
        out.pop(W8A16, None)
    return {r: us for r, us in out.items() if us is not None}


def fixed_route(fmt: Format, m: int) -> Route:
    """The dispatch before the table (KUBELLM_FP8_GEMM=fixed): w8a16 up to 16 rows; above, the format's input
    quantization (per tensor for per-tensor weights, per token for per-channel, per group for blocks) and
    _scaled_mm, or the Triton kernel for blocks."""
    if m <= FIXED_W8A16_ROWS:
        return W8A16
    return {"tensor": SCALED_MM_TENSOR, "channel": SCALED_MM_TOKEN, "block": TRITON_GROUP}[fmt]


def best_route(fmt: Format, shape: str, i: int) -> Route:
    """The fastest route by `estimates` (the fixed route where nothing was measured)."""
    est = estimates(fmt, shape, i)
    if not est:
        return fixed_route(fmt, M_BUCKETS[i])
    return min(est, key=lambda r: est[r])


def table_route(fmt: Format, n: int, k: int, m: int) -> Route:
    """The measured-best route of an M-row product with a weight [N, K] of format `fmt` (KUBELLM_FP8_GEMM=table)."""
    return _TABLE[(fmt, shape_class(n, k), m_bucket(m))]


_TABLE = {(f, s, i): best_route(f, s, i) for f in ("tensor", "channel", "block") for s in SHAPES for i in
          range(len(M_BUCKETS))}  # fmt: skip


def layer_estimate(fmt: Format, i: int) -> tuple[float, float]:
    """(fixed, table) us for one Llama-8B layer's four GEMMs at bucket index i, from the source's figures."""
    fixed = table = 0.0
    for shape in SHAPES:
        est = estimates(fmt, shape, i)
        chosen = best_route(fmt, shape, i)
        old = fixed_route(fmt, M_BUCKETS[i])
        table += est[chosen]
        fixed += est.get(old, est[chosen])
    return fixed, table


def report() -> str:
    """The choice table and the per-layer estimate against the fixed dispatch, as markdown."""
    lines = [f"FP8 GEMM routes chosen from {SOURCE} (us per product, estimated)", ""]
    lines += ["| format | M | " + " | ".join(SHAPES) + " | layer fixed us | layer table us | change |",
              "|---|---:|" + "---|" * len(SHAPES) + "---:|---:|---:|"]  # fmt: skip
    for fmt in ("tensor", "channel", "block"):
        for i, m in enumerate(M_BUCKETS):
            cells = []
            for shape in SHAPES:
                est = estimates(fmt, shape, i)  # type: ignore[arg-type]
                r = best_route(fmt, shape, i)  # type: ignore[arg-type]
                cells.append(f"{r} {est[r]:.1f}")
            fixed, table = layer_estimate(fmt, i)  # type: ignore[arg-type]
            lines.append(f"| {fmt} | {m} | " + " | ".join(cells) + f" | {fixed:.1f} | {table:.1f} | "
                         f"{(table - fixed) / fixed:+.1%} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
