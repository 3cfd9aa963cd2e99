"""Weight GEMMs of small decode batches (M <= 16 rows) as one Triton kernel that streams the weight matrix once.

Why: at batch 1-16 a decode step is bound by reading the weights. cuBLAS reaches ~86% of copy bandwidth on an
8B model's full-size matrices but less on the half- and quarter-size shards of tensor parallelism (bench/
results/engine-gpu-2026-11-28-tp-async.md: ~76% at TP 2). Here each program owns BLOCK_N output columns, walks K
in BLOCK_K chunks and multiplies on tensor cores with M padded to 16; many small programs keep every SM's
memory pipeline full even when N is only a few thousand.

Measured (bench/gemv_micro.py, 1x H200, 8-layer stacks of Llama-3.1-8B shards in CUDA graphs, results in
bench/results/gemv-micro-2026-11-29.json): at M = 1 Triton/cuBLAS is 1.05x on TP 2 shards (3341 vs 3188 GB/s),
1.10x on TP 4 shards and 0.995x on full TP 1 matrices, so layers use it only under tensor parallelism
(the model runner sets layers' `matmul` to `linear` when tp_size > 1).

Numerics: float32 accumulation as cuBLAS does, rounded once to the output dtype; the summation order differs,
so results equal F.linear's to bf16 rounding, not bit for bit. Used only when `enabled()` says so: CUDA, Triton
importable, the engine's gemv_kernel on (--gemv-kernel, KUBELLM_GEMV), at most MAX_ROWS rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs
    triton = None
    tl = None

MAX_ROWS = 16
CONFIG = {"BLOCK_N": 32, "BLOCK_K": 512, "num_warps": 4, "num_stages": 3}  # the sweep's best at TP 2, M = 1

if triton is not None:

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        n_ok = rn < N
        m_ok = rm < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            w = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :], mask=n_ok[:, None] & k_ok[None, :])
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(w))
        out = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], out, mask=m_ok[:, None] & n_ok[None, :])


def enabled(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        triton is not None
        and x.is_cuda
        and x.dim() == 2
        and 0 < x.shape[0] <= MAX_ROWS
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and weight.is_contiguous()
        and _state["on"]
    )


_state = {"on": True}


def configure(on: bool) -> None:
    """The engine's gemv_kernel setting (off: cuBLAS for every product)."""
    _state["on"] = on


def gemv(x: torch.Tensor, weight: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T for M <= 16 rows."""
    cfg = dict(config or CONFIG)
    m, k = x.shape
    n = weight.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_n = cfg.pop("BLOCK_N")
    grid = (triton.cdiv(n, block_n),)
    _gemv_kernel[grid](
        x, weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=16, BLOCK_N=block_n, **cfg,
    )  # fmt: skip
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the Triton kernel when `enabled(x, weight)`."""
    if not enabled(x, weight):
        return F.linear(x, weight, bias)
    out = gemv(x, weight)
    return out if bias is None else out + bias
