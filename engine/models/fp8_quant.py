"""FP8 (e4m3) activation quantization in Triton: per tensor (dynamic or static), per token, per token and
128-column group (DeepSeek's recipe for 128x128-block weights), alone or fused with the op before the GEMM
(RMSNorm, optionally after the residual add; SiLU-and-mul).

Why fused: a W8A8 GEMM needs its input in FP8. Quantizing separately reads the bf16 activation again and costs
a launch (~2-3 us at decode); the norm and the SiLU-and-mul already hold the row in registers, so they can write
FP8 and the scales instead of bf16. Per-tensor *dynamic* scales need the whole tensor's max, so that mode is two
launches and never fused; static per-tensor scales fuse like the per-row modes.

Numerics: scale = max(amax / 448, MIN_SCALE) per row / group / tensor, q = clamp(x / scale, -448, 448) rounded
to nearest; x ~= q * scale. The fused kernels quantize exactly the values the unfused ops would output (the norm
and the activation rounded to the model dtype first), so fused == separate bit for bit.

Every function returns (q, scale): q [M, K] float8_e4m3fn; scale float32 [1] (tensor), [M, 1] (token) or
[M, ceil(K / group)] (group). CUDA tensors only (or Triton's interpreter, TRITON_INTERPRET=1, on CPU tensors).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

from . import fused

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the reference path dequantizes weights and never quantizes activations
    triton = None
    tl = None

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # an all-zero row still gets a finite scale (x / scale stays 0, not NaN)
ROW_CHUNK = 2048  # columns per step of the two-pass per-token kernels (rows longer than this loop)
GROUPS_PER_PROGRAM = 8  # 128-column groups per program of the per-group kernels

Mode = Literal["tensor", "token", "group"]


@dataclass(frozen=True)
class ActQuant:
    """How a GEMM's input is quantized: per tensor (static when `static_scale` is set, else dynamic), per token, or
    per token and `group` columns. `fp8_gemm.act_quant_for` derives it from the weight format."""

    mode: Mode
    group: int = 128
    static_scale: torch.Tensor | None = None

    @property
    def fusable(self) -> bool:
        """Whether a row-local kernel (norm, activation) can produce it: not for dynamic per-tensor scales."""
        return self.mode != "tensor" or self.static_scale is not None


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("FP8 activation quantization needs Triton (`pip install triton`), which is not installed")


def _check_input(name: str, x: torch.Tensor) -> None:
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"fp8 quantization: {name} must be on a CUDA device, got {x.device}")
    if x.dim() != 2:
        raise ValueError(f"fp8 quantization: {name} must be 2-D [tokens, columns], got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        raise ValueError(f"fp8 quantization: {name} must have contiguous rows")


if triton is not None:

    @triton.jit
    def quantize_values(x, scale, QMAX: tl.constexpr):
        # IEEE-rounded division, as torch divides (div_rn does not broadcast: the scale is spread to x's shape)
        return tl.minimum(tl.maximum(tl.div_rn(x, tl.zeros_like(x) + scale), -QMAX), QMAX)

    @triton.jit
    def dynamic_scale(amax, min_scale, QMAX: tl.constexpr):
        """max(amax / 448, min_scale) with IEEE division (div.rn), so scales equal torch's amax / tensor bit for bit
        (not torch's amax / 448 on CUDA, which multiplies by a rounded reciprocal: one ulp off for ~half of amax)."""
        return tl.maximum(tl.div_rn(amax, tl.zeros_like(amax) + QMAX), min_scale)

    @triton.jit
    def _rows_kernel(
        x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, min_scale,
        BLOCK: tl.constexpr, GIVEN_SCALE: tl.constexpr, QMAX: tl.constexpr,
    ):  # fmt: skip
        """One row per program: its amax (two passes over chunks), then q. GIVEN_SCALE: one scale at s_ptr
        (static, or the dynamic per-tensor one) instead of the row's own."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        x_row = x_ptr + row * stride_x
        if GIVEN_SCALE:
            scale = tl.load(s_ptr)
        else:
            amax = tl.zeros((BLOCK,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK):
                x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(x))
            scale = dynamic_scale(tl.max(amax, axis=0), min_scale, QMAX)
            tl.store(s_ptr + row, scale)
        for k0 in range(0, K, BLOCK):
            ok = k0 + cols < K
            x = tl.load(x_row + k0 + cols, mask=ok, other=0.0).to(tl.float32)
            q = quantize_values(x, scale, QMAX)
            tl.store(q_ptr + row * stride_q + k0 + cols, q.to(q_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _tensor_amax_kernel(
        x_ptr, s_ptr, M, K, stride_x, ROWS: tl.constexpr, BLOCK: tl.constexpr, QMAX: tl.constexpr
    ):  # fmt: skip
        """Dynamic per-tensor scale: each program's tile max / 448 atomically maxed into s_ptr (preset to
        MIN_SCALE), so the result is max(amax / 448, MIN_SCALE) without a host sync."""
        rm = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        rk = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = (rm < M)[:, None] & (rk < K)[None, :]
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_x + rk[None, :], mask=ok, other=0.0)
        tl.atomic_max(s_ptr, dynamic_scale(tl.max(tl.max(tl.abs(x.to(tl.float32)), axis=1), axis=0), 0.0, QMAX))

    @triton.jit
    def _groups_kernel(
        x_ptr, q_ptr, s_ptr, K, n_groups, stride_x, stride_q, stride_s, min_scale,
        GROUP: tl.constexpr, GROUPS: tl.constexpr, QMAX: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
        cols = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        ok = cols < K
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        scale = dynamic_scale(tl.max(tl.abs(x), axis=1), min_scale, QMAX)
        tl.store(s_ptr + row * stride_s + g, scale, mask=g < n_groups)
        q = quantize_values(x, scale[:, None], QMAX)
        tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _rms_norm_quant_kernel(
        x_ptr, r_ptr, w_ptr, r_out_ptr, q_ptr, s_ptr,
        stride_x, stride_r, stride_ro, stride_q, stride_s, n_cols, eps, min_scale,
        BLOCK: tl.constexpr, GROUP: tl.constexpr, HAS_RESIDUAL: tl.constexpr, GIVEN_SCALE: tl.constexpr,
        QMAX: tl.constexpr,
    ):  # fmt: skip
        """[residual add,] RMSNorm as fused.py computes it (rounded to the model dtype), then quantized: per row
        (GROUP == 0), per GROUP columns, or with the scale at s_ptr (GIVEN_SCALE)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(r_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
            h = (x + r).to(r_out_ptr.dtype.element_ty)
            tl.store(r_out_ptr + row * stride_ro + cols, h, mask=ok)
            x = h.to(tl.float32)
        var = tl.sum(x * x, axis=0) / n_cols
        y = (x * tl.rsqrt(var + eps)).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        y = (w * y).to(x_ptr.dtype.element_ty).to(tl.float32)  # the bf16 value the unfused norm outputs
        if GIVEN_SCALE:
            q = quantize_values(y, tl.load(s_ptr), QMAX)
        elif GROUP == 0:
            scale = dynamic_scale(tl.max(tl.abs(y), axis=0), min_scale, QMAX)
            tl.store(s_ptr + row, scale)
            q = quantize_values(y, scale, QMAX)
        else:
            y2 = tl.reshape(y, (BLOCK // GROUP, GROUP))
            scale = dynamic_scale(tl.max(tl.abs(y2), axis=1), min_scale, QMAX)
            g = tl.arange(0, BLOCK // GROUP)
            tl.store(s_ptr + row * stride_s + g, scale, mask=g * GROUP < n_cols)
            q = tl.reshape(quantize_values(y2, scale[:, None], QMAX), (BLOCK,))
        tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _silu_mul_tile(x_row, cols, ok, n_cols):
        """silu(gate) * up for columns `cols` of one row, rounded to x's dtype as fused.silu_mul rounds (silu, then
        the product)."""
        g = tl.load(x_row + cols, mask=ok, other=0.0)
        u = tl.load(x_row + n_cols + cols, mask=ok, other=0.0).to(tl.float32)
        gf = g.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
        return (act * u).to(g.dtype).to(tl.float32)

    @triton.jit
    def _silu_mul_quant_groups_kernel(
        x_ptr, q_ptr, s_ptr, n_cols, n_groups, stride_x, stride_q, stride_s, min_scale,
        GROUP: tl.constexpr, GROUPS: tl.constexpr, GIVEN_SCALE: tl.constexpr, QMAX: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
        cols = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        ok = cols < n_cols
        h = _silu_mul_tile(x_ptr + row * stride_x, cols, ok, n_cols)
        if GIVEN_SCALE:
            q = quantize_values(h, tl.load(s_ptr), QMAX)
        else:
            scale = dynamic_scale(tl.max(tl.abs(h), axis=1), min_scale, QMAX)
            tl.store(s_ptr + row * stride_s + g, scale, mask=g < n_groups)
            q = quantize_values(h, scale[:, None], QMAX)
        tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _silu_mul_quant_rows_kernel(
        x_ptr, q_ptr, s_ptr, n_cols, stride_x, stride_q, min_scale, BLOCK: tl.constexpr, QMAX: tl.constexpr
    ):  # fmt: skip
        """Per-token: the row's amax in a first pass, the activation recomputed in the second (it is in L2)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        x_row = x_ptr + row * stride_x
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, n_cols, BLOCK):
            h = _silu_mul_tile(x_row, k0 + cols, k0 + cols < n_cols, n_cols)
            amax = tl.maximum(amax, tl.abs(h))
        scale = dynamic_scale(tl.max(amax, axis=0), min_scale, QMAX)
        tl.store(s_ptr + row, scale)
        for k0 in range(0, n_cols, BLOCK):
            ok = k0 + cols < n_cols
            h = _silu_mul_tile(x_row, k0 + cols, ok, n_cols)
            tl.store(
                q_ptr + row * stride_q + k0 + cols, quantize_values(h, scale, QMAX).to(q_ptr.dtype.element_ty), mask=ok
            )


def _static(scale: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A static per-tensor scale as the [1] float32 device tensor the kernels read."""
    if scale.numel() != 1:
        raise ValueError(f"fp8 quantization: a static input scale must be one number, got shape {tuple(scale.shape)}")
    return scale.reshape(1).to(device=device, dtype=torch.float32)


def _n_groups(k: int, group: int) -> int:
    if group < 16 or group & (group - 1):
        raise ValueError(f"fp8 quantization: the group size must be a power of two >= 16, got {group}")
    return -(-k // group)


def quantize(x: torch.Tensor, spec: ActQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (bf16/fp16/fp32) -> (q, scale) as `spec` says."""
    _require_triton()
    _check_input("x", x)
    m, k = x.shape
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    block = min(triton.next_power_of_2(max(k, 16)), ROW_CHUNK)
    if spec.mode == "tensor":
        if spec.static_scale is not None:
            scale = _static(spec.static_scale, x.device)
        else:
            scale = torch.full((1,), MIN_SCALE, dtype=torch.float32, device=x.device)
            if m:
                _tensor_amax_kernel[(triton.cdiv(m, 16), triton.cdiv(k, 1024))](
                    x, scale, m, k, x.stride(0), ROWS=16, BLOCK=1024, QMAX=FP8_MAX, num_warps=4
                )
        if m:
            _rows_kernel[(m,)](
                x, q, scale, k, x.stride(0), q.stride(0), MIN_SCALE, BLOCK=block, GIVEN_SCALE=True, QMAX=FP8_MAX,
                num_warps=4,
            )  # fmt: skip
        return q, scale
    if spec.mode == "token":
        scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
        if m:
            _rows_kernel[(m,)](
                x, q, scale, k, x.stride(0), q.stride(0), MIN_SCALE, BLOCK=block, GIVEN_SCALE=False, QMAX=FP8_MAX,
                num_warps=4,
            )  # fmt: skip
        return q, scale
    n_groups = _n_groups(k, spec.group)
    scale = torch.empty((m, n_groups), dtype=torch.float32, device=x.device)
    if m:
        groups = min(GROUPS_PER_PROGRAM, triton.next_power_of_2(n_groups))
        _groups_kernel[(m, triton.cdiv(n_groups, groups))](
            x, q, scale, k, n_groups, x.stride(0), q.stride(0), scale.stride(0), MIN_SCALE,
            GROUP=spec.group, GROUPS=groups, QMAX=FP8_MAX, num_warps=4,
        )  # fmt: skip
    return q, scale


def rms_norm_quant(
    x: torch.Tensor, weight: torch.Tensor, eps: float, spec: ActQuant, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """RMSNorm(x) quantized as `spec` says, or with `residual`: RMSNorm(residual + x), also returning residual + x
    (the next residual stream). Returns (residual_out or None, q, scale). Raises ValueError for a spec no
    row-local kernel can produce (dynamic per-tensor: check `spec.fusable`)."""
    _require_triton()
    _check_input("x", x)
    if not spec.fusable:
        raise ValueError("fp8 quantization: dynamic per-tensor scales cannot be fused into the norm")
    if residual is not None and (residual.shape != x.shape or residual.stride(-1) != 1):
        raise ValueError(f"rms_norm_quant: residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    m, n = x.shape
    res_out = torch.empty_like(residual) if residual is not None else None
    q = torch.empty((m, n), dtype=FP8_DTYPE, device=x.device)
    group = 0
    if spec.static_scale is not None:
        scale = _static(spec.static_scale, x.device)
    elif spec.mode == "token":
        scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    else:
        group = spec.group
        scale = torch.empty((m, _n_groups(n, group)), dtype=torch.float32, device=x.device)
    if m:
        r = residual if residual is not None else x
        ro = res_out if res_out is not None else x
        _rms_norm_quant_kernel[(m,)](
            x, r, weight, ro, q, scale, x.stride(0), r.stride(0), ro.stride(0), q.stride(0),
            scale.stride(0) if scale.dim() == 2 else 0, n, eps, MIN_SCALE,
            BLOCK=max(triton.next_power_of_2(n), group, 16), GROUP=group, HAS_RESIDUAL=residual is not None,
            GIVEN_SCALE=spec.static_scale is not None, QMAX=FP8_MAX,
            num_warps=fused.RMS_NORM_WARPS,  # fused.rms_norm's reduction order: the same normed values
        )  # fmt: skip
    return res_out, q, scale


def silu_mul_quant(x: torch.Tensor, spec: ActQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(x[:, :n]) * x[:, n:] of the fused gate_up output [T, 2n], quantized as `spec` says."""
    _require_triton()
    _check_input("x", x)
    if not spec.fusable:
        raise ValueError("fp8 quantization: dynamic per-tensor scales cannot be fused into SiLU-and-mul")
    m, two_n = x.shape
    if two_n % 2:
        raise ValueError(f"silu_mul_quant: x must have an even number of columns, got {two_n}")
    n = two_n // 2
    q = torch.empty((m, n), dtype=FP8_DTYPE, device=x.device)
    if spec.mode == "token" and spec.static_scale is None:
        scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
        if m:
            _silu_mul_quant_rows_kernel[(m,)](
                x, q, scale, n, x.stride(0), q.stride(0), MIN_SCALE,
                BLOCK=min(triton.next_power_of_2(n), ROW_CHUNK), QMAX=FP8_MAX, num_warps=4,
            )  # fmt: skip
        return q, scale
    static = spec.static_scale is not None
    group = 128 if static else spec.group  # static: any tiling; the scale is one number
    n_groups = _n_groups(n, group)
    scale = _static(spec.static_scale, x.device) if static else torch.empty(
        (m, n_groups), dtype=torch.float32, device=x.device
    )  # fmt: skip
    if m:
        groups = min(GROUPS_PER_PROGRAM, triton.next_power_of_2(n_groups))
        _silu_mul_quant_groups_kernel[(m, triton.cdiv(n_groups, groups))](
            x, q, scale, n, n_groups, x.stride(0), q.stride(0), scale.stride(0) if not static else 0, MIN_SCALE,
            GROUP=group, GROUPS=groups, GIVEN_SCALE=static, QMAX=FP8_MAX, num_warps=4,
        )  # fmt: skip
    return q, scale
