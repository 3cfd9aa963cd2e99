"""FP8 (e4m3) linear layers: y = x @ dequant(W)^T for weights stored as float8_e4m3fn with a per-tensor,
per-output-channel or (bn x bk)-block scale (w ~= w_fp8 * scale), as FP8 checkpoints ship them.

Why FP8: on Hopper it halves the weight bytes a decode step reads and doubles the tensor-core rate of prefill.

Paths of `fp8_linear` (x [M, K] bf16/fp16):
  - CPU (or no FP8-capable GPU): `fp8_linear_reference`, the weight dequantized and multiplied in float32.
Which path a product takes is `plan_route`'s choice (the engine's KUBELLM_FP8_GEMM: "fixed", the default, is the
list below; "table" the measured-best route per weight format, shape class and M bucket of models/fp8_dispatch.py;
"tune" the routes timed at warm-up by models/fp8_tune.py). Routes: W8A16 or the split-K kernel (bf16 rows), or an
input quantization (per tensor, per token, per group) then _scaled_mm or the Triton W8A8 kernel.
  - CUDA, M <= GEMV_MAX_ROWS: `_w8a16_kernel`, a weight-streaming kernel that reads FP8 weights, dequantizes
    them in registers and multiplies the unquantized bf16 rows: decode is bound by the weight bytes, so skipping
    the activation quantization saves a launch and keeps bf16 activations.
  - CUDA, larger M, W8A8: the input is quantized (fp8_quant; how is `act_quant_for`'s single decision), then
      per-tensor / per-channel weights: torch._scaled_mm (cuBLASLt / CUTLASS, tensor-wise or row-wise scales);
      block weights: `_w8a8_kernel` of ours (Triton), the 1 x bk activation groups and bn x bk weight blocks
      applied to each bk-deep partial product in float32 (DeepSeek's recipe), or flashinfer's DeepGEMM-based
      `fp8_blockscale_gemm_sm90` where bench/fp8_micro.py measured it faster (FLASHINFER_BLOCK_MIN_ROWS).
Callers that already hold the quantized input (a norm or SiLU-and-mul fused with the quantization, see
fp8_quant) call `fp8_gemm` directly.

Interface shared with the loader (engine/models, the fp8 checkpoint formats): `fp8_linear(x, weight, weight_scale,
*, block_size=None, input_scale=None, out_dtype=torch.bfloat16)`, `quantize_weight_fp8(w)` (online
`--quantization fp8`) and `fp8_linear_reference`.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from . import fp8_dispatch, fp8_quant, fused
from .fp8_dispatch import W8A16, Route
from .fp8_quant import FP8_DTYPE, FP8_MAX, ActQuant

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the reference path
    triton = None
    tl = None

ScaleKind = Literal["tensor", "channel", "block"]

GEMV_MAX_ROWS = 16  # up to this many rows fp8_linear takes the W8A16 kernel (bench/fp8_micro.py measures it)
W8A16_MAX_ROWS = 64  # the most rows one W8A16 program holds (the x tile: rows x BLOCK_K in shared memory)
# Block-scaled GEMMs of at least this many rows go to flashinfer's fp8_blockscale_gemm_sm90 when importable on sm90;
# None: never (our Triton kernel). Set from bench/fp8_micro.py's measurement on the GPU.
FLASHINFER_BLOCK_MIN_ROWS: int | None = None
# Dynamic activation scales for per-tensor weights: per tensor as vLLM's `--quantization fp8` does (two launches,
# not fusable), or per token (one launch, fusable, row-wise _scaled_mm). bench/fp8_micro.py times both.
PER_TENSOR_WEIGHTS_PER_TOKEN_INPUT = False

# Which path each product takes (the engine's fp8_gemm setting, KUBELLM_FP8_GEMM): "fixed" the rules above (W8A16 up
# to GEMV_MAX_ROWS, else the format's W8A8); "table" the measured-best route per (format, shape class, M bucket) of
# models/fp8_dispatch.py; "tune" the routes the engine timed at warm-up (fp8_tune.py), the table's elsewhere.
# `splitk` (KUBELLM_FP8_SPLITK) lets a tuned route use the split-K kernel (off: W8A16 in its place).
DISPATCH_MODES = ("fixed", "table", "tune")
_dispatch: dict = {"mode": "fixed", "splitk": True}
_tuned: dict[tuple, Route] = {}  # dispatch_key -> the route warm-up timing chose
_route_cache: dict[tuple, Route] = {}


@dataclass(frozen=True)
class TileConfig:
    BLOCK_M: int
    BLOCK_N: int
    GROUP_M: int
    num_warps: int
    num_stages: int


def w8a8_config(m: int) -> TileConfig:
    """Tiles of the Triton W8A8 kernel by batch rows (BLOCK_K is the weight block's bk, 128)."""
    if m <= 16:
        return TileConfig(16, 64, 1, 4, 4)
    if m <= 64:
        return TileConfig(64, 64, 8, 4, 4)
    if m <= 256:
        return TileConfig(64, 128, 8, 4, 3)
    return TileConfig(128, 128, 8, 8, 3)


# W8A16 tiles per weight format. gemv.py's bf16 sweep found 32 columns x 512 deep best at M = 1 (~cuBLAS); FP8
# weights halve a tile's bytes, so per-tensor / per-channel keep that shape. Block scales change every 128 columns
# of K, so a step is 128 deep and more stages keep as many bytes in flight. bench/fp8_micro.py sweeps both.
W8A16_CONFIG = {
    "tensor": {"BLOCK_N": 32, "BLOCK_K": 512, "num_warps": 4, "num_stages": 3},
    "channel": {"BLOCK_N": 32, "BLOCK_K": 512, "num_warps": 4, "num_stages": 3},
    "block": {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 6},
}


# ---- formats, reference, weight quantization (torch; CPU and GPU) ----


def scale_kind(weight: torch.Tensor, weight_scale: torch.Tensor, block_size: tuple[int, int] | None) -> ScaleKind:
    """Which scale layout `weight_scale` is for `weight` [N, K]; ValueError naming the mismatch otherwise."""
    if weight.dtype != FP8_DTYPE:
        raise ValueError(f"fp8_linear: weight must be {FP8_DTYPE}, got {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"fp8_linear: weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    if weight.stride(1) != 1 and weight.shape[1] > 1:
        raise ValueError("fp8_linear: weight rows must be contiguous (K the fastest axis, as checkpoints store them)")
    n, k = weight.shape
    shape = tuple(weight_scale.shape)
    if block_size is not None:
        bn, bk = block_size
        want = (-(-n // bn), -(-k // bk))
        if shape != want:
            raise ValueError(f"fp8_linear: block scales for weight [{n}, {k}] in {bn}x{bk} blocks must be {want}, "
                             f"got {shape}")  # fmt: skip
        return "block"
    if weight_scale.numel() == 1:
        return "tensor"
    if shape in ((n,), (n, 1)):
        return "channel"
    raise ValueError(
        f"fp8_linear: weight_scale of shape {shape} fits neither per-tensor (one number) nor per-channel ([{n}] or "
        f"[{n}, 1]) scales of weight [{n}, {k}]; block scales need block_size"
    )


def dequantize_weight_fp8(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    block_size: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """w_fp8 * scale in `dtype`, for any of the three scale layouts."""
    kind = scale_kind(weight, weight_scale, block_size)
    w = weight.to(torch.float32)
    s = weight_scale.to(device=w.device, dtype=torch.float32)
    if kind == "tensor":
        w = w * s.reshape(())
    elif kind == "channel":
        w = w * s.reshape(-1, 1)
    else:
        assert block_size is not None
        bn, bk = block_size
        n, k = w.shape
        w = w * s.repeat_interleave(bn, dim=0)[:n].repeat_interleave(bk, dim=1)[:, :k]
    return w.to(dtype)


def fp8_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    *,
    block_size: tuple[int, int] | None = None,
    input_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The dequantized weight times x in float32, rounded once to out_dtype: the model an FP8 checkpoint stands
    for. Activations are not quantized (`input_scale` is accepted and unused): that is the GPU kernels'
    approximation, which the gpu tests bound against this."""
    del input_scale
    w = dequantize_weight_fp8(weight, weight_scale, block_size)
    return (x.to(torch.float32) @ w.to(x.device).t()).to(out_dtype)


def quantize_weight_fp8(w: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A bf16/fp16/fp32 weight [N, K] -> (w_fp8, scale) with w ~= w_fp8 * scale; scale float32, 0-d per tensor
    (vLLM's online `--quantization fp8`) or [N] per output channel. On w's device, CPU or GPU."""
    if w.dim() != 2:
        raise ValueError(f"quantize_weight_fp8: weight must be 2-D [N, K], got shape {tuple(w.shape)}")
    amax = w.abs().amax(dim=1) if per_channel else w.abs().amax()
    scale = (amax.to(torch.float32) / FP8_MAX).clamp_min(fp8_quant.MIN_SCALE)
    s = scale[:, None] if per_channel else scale
    q = (w.to(torch.float32) / s).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


# ---- the CUDA path ----


def act_quant_for(kind: ScaleKind, block_size: tuple[int, int] | None, input_scale: torch.Tensor | None) -> ActQuant:
    """How the input of a W8A8 GEMM with these weights is quantized: the one place that decides it."""
    if input_scale is not None:
        return ActQuant("tensor", static_scale=input_scale)
    if kind == "block":
        assert block_size is not None
        return ActQuant("group", group=block_size[1])
    if kind == "channel" or PER_TENSOR_WEIGHTS_PER_TOKEN_INPUT:
        return ActQuant("token")
    return ActQuant("tensor")


def _on_gpu(x: torch.Tensor) -> bool:
    return x.is_cuda or (os.environ.get("TRITON_INTERPRET") == "1" and triton is not None)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def supported(device: torch.device) -> bool:
    """Whether this device has FP8 tensor cores (sm89+: Ada, Hopper, Blackwell) and Triton is importable."""
    if device.type != "cuda" or triton is None:
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= (8, 9)


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("the FP8 GEMM kernels need Triton (`pip install triton`), which is not installed")


def configure(mode: str = "fixed", splitk: bool = True) -> None:
    """The engine's fp8_gemm and fp8_splitk settings (see DISPATCH_MODES); tuned routes are kept (set_tuned)."""
    if mode not in DISPATCH_MODES:
        raise ValueError(f"fp8 GEMM dispatch must be one of {', '.join(DISPATCH_MODES)}, got {mode!r}")
    _dispatch.update(mode=mode, splitk=bool(splitk))
    _route_cache.clear()


def dispatch_mode() -> str:
    return _dispatch["mode"]


def dispatch_key(kind: ScaleKind, static: bool, n: int, k: int, m: int) -> tuple:
    """What a tuned route is kept under: weight format, static input scale or not, weight [N, K], M bucket."""
    return (kind, static, n, k, fp8_dispatch.m_bucket(m))


def set_tuned(routes: dict[tuple, Route]) -> None:
    """Routes chosen by warm-up timing (models/fp8_tune.py), used in the "tune" mode; replaces earlier ones."""
    _tuned.clear()
    _tuned.update(routes)
    _route_cache.clear()


@contextlib.contextmanager
def dispatch_settings(mode: str, splitk: bool, tuned: dict[tuple, Route]) -> Iterator[None]:
    """The dispatch set for a block and restored after it: the process-wide setting outlives any one caller (the
    tests that pin a route use it)."""
    before = (_dispatch["mode"], _dispatch["splitk"], dict(_tuned))
    try:
        configure(mode, splitk)
        set_tuned(tuned)
        yield
    finally:
        configure(before[0], before[1])
        set_tuned(before[2])


def plan_route(kind: ScaleKind, static: bool, n: int, k: int, m: int, out_dtype: torch.dtype, cuda: bool) -> Route:
    """The route an M-row product takes under the current dispatch, made runnable: bf16-input kernels only up to
    W8A16_MAX_ROWS rows, the split-K kernel only while allowed, _scaled_mm only on CUDA and where its shape and
    scale rules allow (else the Triton kernel with the same input quantization)."""
    key = (kind, static, n, k, fp8_dispatch.m_bucket(m), out_dtype, cuda, m <= W8A16_MAX_ROWS, m <= GEMV_MAX_ROWS)
    hit = _route_cache.get(key)
    if hit is not None:
        return hit
    mode = _dispatch["mode"]
    r = _tuned.get(key[:5]) if mode == "tune" else None
    if r is None:
        r = fp8_dispatch.fixed_route(kind, m) if mode == "fixed" else fp8_dispatch.table_route(kind, n, k, m)
    if mode == "fixed" and PER_TENSOR_WEIGHTS_PER_TOKEN_INPUT and r == fp8_dispatch.SCALED_MM_TENSOR:
        r = fp8_dispatch.SCALED_MM_TOKEN
    if r.kernel == "splitk" and not _dispatch["splitk"]:
        r = W8A16
    if r.act == "bf16" and m > W8A16_MAX_ROWS:
        r = fp8_dispatch.fixed_route(kind, max(m, GEMV_MAX_ROWS + 1))
    if kind == "block" and r.act != "bf16":
        r = fp8_dispatch.TRITON_GROUP  # block weights: the Triton kernel on per-group inputs (or flashinfer's)
    if r.kernel == "scaled_mm":
        tensorwise = kind == "tensor" and (r.act == "tensor" or static)
        if not (cuda and k % 16 == 0 and n % 16 == 0 and (tensorwise or out_dtype == torch.bfloat16)):
            r = Route("triton", r.act)
    _route_cache[key] = r
    return r


def act_spec(
    route: Route, kind: ScaleKind, block_size: tuple[int, int] | None, input_scale: torch.Tensor | None
) -> ActQuant:
    """How a W8A8 route quantizes its input: a static scale wins; the fixed dispatch keeps act_quant_for's rule."""
    if _dispatch["mode"] == "fixed" or input_scale is not None:
        return act_quant_for(kind, block_size, input_scale)
    if route.act == "group":
        return ActQuant("group", group=block_size[1] if block_size is not None else 128)
    return ActQuant("token" if route.act == "token" else "tensor")


def _w8a8_tile(kind: ScaleKind, m: int) -> TileConfig | None:
    """The table's tile for block weights above 256 rows (fp8_dispatch.BLOCK_W8A8_TILE_ABOVE_256); None: default."""
    if kind == "block" and m > 256 and _dispatch["mode"] != "fixed":
        return TileConfig(*fp8_dispatch.BLOCK_W8A8_TILE_ABOVE_256)
    return None


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    *,
    block_size: tuple[int, int] | None = None,
    input_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """x [..., K] @ dequant(weight [N, K])^T -> [..., N] in out_dtype. input_scale None: dynamic activation scales
    (per tensor for per-tensor weights, per token for per-channel, per token and bk-column group for blocks);
    else a static per-tensor scale. CPU tensors take the float32 reference."""
    kind = scale_kind(weight, weight_scale, block_size)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_linear: x has {x.shape[-1]} columns, weight [{weight.shape[0]}, {weight.shape[1]}] "
                         f"wants {weight.shape[1]}")  # fmt: skip
    if not _on_gpu(x) or (x.is_cuda and not supported(x.device)):  # no FP8 tensor cores: dequantize (slow, exact)
        return fp8_linear_reference(
            x, weight, weight_scale, block_size=block_size, input_scale=input_scale, out_dtype=out_dtype
        )
    _require_triton()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], weight.shape[0]
    if m == 0:
        return torch.empty((*lead, n), dtype=out_dtype, device=x.device)
    r = plan_route(kind, input_scale is not None, n, weight.shape[1], m, out_dtype, x2.is_cuda)
    out = run_route(r, x2, weight, weight_scale, kind, block_size, input_scale, out_dtype)
    return out.reshape(*lead, n)


def run_route(
    r: Route, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, kind: ScaleKind,
    block_size: tuple[int, int] | None, input_scale: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """x [M, K] (contiguous rows, M >= 1) through route `r` (plan_route's, or a warm-up candidate: fp8_tune)."""
    m = x.shape[0]
    if r.kernel == "splitk":
        cfg = SplitKConfig(*r.tile) if r.tile is not None else None  # type: ignore[arg-type]
        return splitk(x, weight, weight_scale, kind, block_size, out_dtype, cfg)
    if r.kernel == "w8a16":
        return w8a16(x, weight, weight_scale, kind, block_size, out_dtype)
    if kind == "block" and _use_flashinfer_block(m, x, weight, input_scale):
        return _flashinfer_block(x, weight, weight_scale, out_dtype)
    xq, xs = fp8_quant.quantize(x, act_spec(r, kind, block_size, input_scale))
    return fp8_gemm(xq, xs, weight, weight_scale, block_size=block_size, out_dtype=out_dtype,
                    use_scaled_mm=r.kernel == "scaled_mm", config=_w8a8_tile(kind, m))  # fmt: skip


def fused_input_spec(
    m: int,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    *,
    block_size: tuple[int, int] | None = None,
    input_scale: torch.Tensor | None = None,
) -> ActQuant | None:
    """The quantization fp8_linear would give an M-row input of this layer, when the kernel before the layer may
    produce it instead (fp8_quant.rms_norm_quant / silu_mul_quant, then `fp8_gemm`: the same bits, one launch and
    one bf16 round trip fewer). None: call fp8_linear with the bf16 rows (CPU, a route reading bf16 rows: W8A16 or
    split-K, flashinfer's block GEMM, or dynamic per-tensor scales, which no row-local kernel can make)."""
    if not weight.is_cuda or not supported(weight.device) or m < 1:
        return None
    kind = scale_kind(weight, weight_scale, block_size)
    r = plan_route(kind, input_scale is not None, weight.shape[0], weight.shape[1], m, torch.bfloat16, True)
    if r.act == "bf16":
        return None
    if (
        kind == "block"
        and input_scale is None
        and FLASHINFER_BLOCK_MIN_ROWS is not None
        and m >= FLASHINFER_BLOCK_MIN_ROWS
    ):
        return None
    spec = act_spec(r, kind, block_size, input_scale)
    return spec if spec.fusable else None


def silu_mul_fp8_linear(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    *,
    block_size: tuple[int, int] | None = None,
    input_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """fp8_linear(silu(gate_up[:, :n]) * gate_up[:, n:], ...): an MLP's down projection on its fused gate_up output.
    Where `fused_input_spec` allows, SiLU-and-mul writes the FP8 input and its scales directly (silu_mul_quant),
    else the bf16 activation (fused.silu_mul on CUDA, torch on CPU) goes through fp8_linear: the same result."""
    m, n = gate_up.shape[0], gate_up.shape[-1] // 2
    spec = fused_input_spec(m, weight, weight_scale, block_size=block_size, input_scale=input_scale)
    if spec is not None and gate_up.dim() == 2 and gate_up.stride(-1) == 1:
        xq, xs = fp8_quant.silu_mul_quant(gate_up, spec)
        kind = scale_kind(weight, weight_scale, block_size)
        r = plan_route(kind, input_scale is not None, weight.shape[0], weight.shape[1], m, out_dtype, gate_up.is_cuda)
        return fp8_gemm(xq, xs, weight, weight_scale, block_size=block_size, out_dtype=out_dtype,
                        use_scaled_mm=r.kernel == "scaled_mm", config=_w8a8_tile(kind, m))  # fmt: skip
    act = fused.silu_mul(gate_up) if fused.enabled(gate_up) else None
    if act is None:
        act = torch.nn.functional.silu(gate_up[..., :n]) * gate_up[..., n:]
    return fp8_linear(act, weight, weight_scale, block_size=block_size, input_scale=input_scale, out_dtype=out_dtype)


def fp8_gemm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    *,
    block_size: tuple[int, int] | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    use_scaled_mm: bool | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """W8A8: xq [M, K] float8 with x_scale [1] / [M, 1] / [M, K/bk] (fp8_quant's layouts) times weight [N, K].
    Per-tensor / per-channel weights go to torch._scaled_mm when its shape rules allow (use_scaled_mm None), else
    to the Triton kernel (also for blocks), tiled by `config` (default: w8a8_config(M))."""
    kind = scale_kind(weight, weight_scale, block_size)
    m, k = xq.shape
    n = weight.shape[0]
    ws = weight_scale.to(torch.float32)
    if use_scaled_mm is None:
        tensorwise = kind == "tensor" and x_scale.numel() == 1
        use_scaled_mm = (
            kind != "block" and xq.is_cuda and k % 16 == 0 and n % 16 == 0 and m > 0
            and (tensorwise or out_dtype == torch.bfloat16)  # row-wise scales: bf16 output only
        )  # fmt: skip
    if use_scaled_mm:
        return _scaled_mm(xq, x_scale, weight, ws, kind, out_dtype)
    _require_triton()
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0:
        return out
    a_mode = 0 if x_scale.numel() == 1 else (1 if x_scale.shape[1] == 1 else 2)
    b_mode = {"tensor": 0, "channel": 1, "block": 2}[kind]
    bn, bk = block_size if block_size is not None else (128, 128)
    if a_mode == 2 and x_scale.shape != (m, -(-k // bk)):
        raise ValueError(f"fp8_gemm: group scales of x must be [{m}, {-(-k // bk)}] for bk={bk}, got "
                         f"{tuple(x_scale.shape)}")  # fmt: skip
    cfg = config or w8a8_config(m)
    grid = (triton.cdiv(m, cfg.BLOCK_M) * triton.cdiv(n, cfg.BLOCK_N),)
    _w8a8_kernel[grid](
        xq, weight, out, x_scale, ws, m, n, k,
        xq.stride(0), weight.stride(0), out.stride(0),
        x_scale.stride(0) if a_mode else 0, x_scale.stride(1) if a_mode == 2 else 0,
        ws.stride(0) if b_mode else 0, ws.stride(1) if b_mode == 2 else 0,
        A_MODE=a_mode, B_MODE=b_mode, BN=bn, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=bk,
        GROUP_M=cfg.GROUP_M, EVEN_K=k % bk == 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def _scaled_mm(
    xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, ws: torch.Tensor, kind: ScaleKind,
    out_dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """torch._scaled_mm: tensor-wise when both scales are single numbers, else row-wise ([M, 1] and [1, N])."""
    m, n = xq.shape[0], weight.shape[0]
    if x_scale.numel() == 1 and kind == "tensor":
        return torch._scaled_mm(xq, weight.t(), scale_a=x_scale.reshape(()), scale_b=ws.reshape(()),
                                out_dtype=out_dtype)  # fmt: skip
    sa = x_scale.reshape(-1, 1).expand(m, 1).contiguous() if x_scale.numel() == 1 else x_scale.reshape(m, 1)
    sb = ws.reshape(1, -1).expand(1, n).contiguous() if kind == "tensor" else ws.reshape(1, n)
    return torch._scaled_mm(xq, weight.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)


def w8a16(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, kind: ScaleKind,
    block_size: tuple[int, int] | None, out_dtype: torch.dtype, config: dict | None = None,
) -> torch.Tensor:  # fmt: skip
    """Few rows (decode, at most W8A16_MAX_ROWS): FP8 weights dequantized in registers times the bf16 rows; no
    activation quantization. Every program holds all rows, so the weights stream once."""
    _require_triton()
    cfg = dict(config or W8A16_CONFIG[kind])
    m, k = x.shape
    if m > W8A16_MAX_ROWS:
        raise ValueError(f"w8a16: at most {W8A16_MAX_ROWS} rows, got {m} (more rows take the W8A8 path)")
    block_m = max(16, triton.next_power_of_2(m))
    cfg["BLOCK_K"] = min(cfg["BLOCK_K"], 8192 // block_m)  # the x tile stays <= 16 KB a stage
    n = weight.shape[0]
    ws = weight_scale.to(torch.float32)
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0:
        return out
    bn, bk = block_size if block_size is not None else (128, 128)
    b_mode = {"tensor": 0, "channel": 1, "block": 2}[kind]
    if b_mode == 2:  # each K step must stay inside one weight block
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], bk)
        if bk % cfg["BLOCK_K"]:
            raise ValueError(f"w8a16: BLOCK_K {cfg['BLOCK_K']} must divide the block's bk {bk}")
    block_n = cfg.pop("BLOCK_N")
    _w8a16_kernel[(triton.cdiv(n, block_n),)](
        x, weight, out, ws, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        ws.stride(0) if b_mode else 0, ws.stride(1) if b_mode == 2 else 0,
        B_MODE=b_mode, BN=bn, BK=bk, BLOCK_M=block_m, BLOCK_N=block_n, **cfg,
    )  # fmt: skip
    return out


# ---- split-K small-M kernel: every SM streaming weights ----

SPLITK_PROGRAMS_PER_SM = 4  # enough programs that every SM keeps several weight tiles in flight
SPLITK_MAX_ROWS = W8A16_MAX_ROWS
SPLITK_DOT_MIN_ROWS = 2  # from this many rows the tiles multiply on tensor cores by default; one row: CUDA-core FMAs


@dataclass(frozen=True)
class SplitKConfig:
    BLOCK_N: int
    BLOCK_K: int
    SPLIT_K: int  # programs along K per BLOCK_N columns; 1: one pass, no partial sums
    num_warps: int
    num_stages: int
    use_dot: bool


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def triton_next_pow2(v: int) -> int:
    """triton.next_power_of_2 without Triton (the config is pure)."""
    return 1 << max(0, v - 1).bit_length()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """SMs of a CUDA device; 132 (an H100/H200) for CPU tensors (the interpreter and the compile check)."""
    if device.type != "cuda":
        return 132
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def splitk_config(
    m: int, n: int, k: int, kind: ScaleKind, block_size: tuple[int, int] | None, sms: int,
    block_n: int | None = None, block_k: int | None = None, split_k: int | None = None, num_warps: int = 4,
    num_stages: int = 3, use_dot: bool | None = None,
) -> SplitKConfig:  # fmt: skip
    """A runnable tiling for M rows of weight [N, K]: by default SPLIT_K so that tiles x splits reach
    SPLITK_PROGRAMS_PER_SM programs per SM, each split a whole number of BLOCK_K steps (and of the block scales'
    bk, which a K step must not straddle). Pure: the tuner's candidates are this with other arguments."""
    if not 1 <= m <= SPLITK_MAX_ROWS:
        raise ValueError(f"splitk: 1 to {SPLITK_MAX_ROWS} rows, got {m}")
    if use_dot is None:
        use_dot = m >= SPLITK_DOT_MIN_ROWS
    if not use_dot and m > 4:
        raise ValueError(f"splitk: the CUDA-core variant holds at most 4 rows, got {m}")
    bn = block_n or 32
    # CUDA cores hold a rows x BLOCK_N x BLOCK_K product in registers: fewer columns per step for more rows
    bk = block_k or (128 if use_dot else max(64, 256 // triton_next_pow2(m)))
    if kind == "block":
        assert block_size is not None
        bk = min(bk, block_size[1])
        if block_size[1] % bk:
            raise ValueError(f"splitk: BLOCK_K {bk} must divide the block's bk {block_size[1]}")
    step = max(bk, block_size[1]) if kind == "block" and block_size is not None else bk
    tiles = -(-n // bn)
    if split_k is None:
        split_k = -(-SPLITK_PROGRAMS_PER_SM * sms // tiles)
    split_k = max(1, min(split_k, -(-k // step)))
    per = _cdiv(_cdiv(k, split_k), step) * step  # K per split, whole steps
    return SplitKConfig(bn, bk, -(-k // per), num_warps, num_stages, use_dot)


def splitk(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, kind: ScaleKind,
    block_size: tuple[int, int] | None, out_dtype: torch.dtype, config: SplitKConfig | None = None,
) -> torch.Tensor:  # fmt: skip
    """Few rows (decode): FP8 weights times bf16 rows like `w8a16`, but K split over SPLIT_K programs per BLOCK_N
    columns so that a layer of few columns still gives every SM weights to stream. SPLIT_K > 1: each program
    writes float32 partial sums, a second kernel adds them, scales and rounds once (deterministic, no atomics)."""
    _require_triton()
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0:
        return out
    if m > SPLITK_MAX_ROWS:
        raise ValueError(f"splitk: at most {SPLITK_MAX_ROWS} rows, got {m} (more rows take a W8A8 route)")
    cfg = config or splitk_config(m, n, k, kind, block_size, sm_count(x.device))
    if not cfg.use_dot and m > 4:
        raise ValueError(f"splitk: the CUDA-core variant holds at most 4 rows, got {m}")
    if kind == "block" and (block_size is None or block_size[1] % cfg.BLOCK_K):
        raise ValueError(f"splitk: BLOCK_K {cfg.BLOCK_K} must divide the block's bk {block_size}")
    ws = weight_scale.to(torch.float32)
    bn, bk = block_size if block_size is not None else (128, 128)
    b_mode = {"tensor": 0, "channel": 1, "block": 2}[kind]
    step = max(cfg.BLOCK_K, bk) if b_mode == 2 else cfg.BLOCK_K
    per = _cdiv(_cdiv(k, cfg.SPLIT_K), step) * step
    split = -(-k // per)
    block_m = max(16, triton_next_pow2(m)) if cfg.use_dot else triton_next_pow2(m)
    partial = split > 1
    dst = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if partial else out
    _splitk_kernel[(triton.cdiv(n, cfg.BLOCK_N), split)](
        x, weight, dst, ws, m, n, k, per, x.stride(0), weight.stride(0),
        dst.stride(1) if partial else out.stride(0), dst.stride(0) if partial else 0,
        ws.stride(0) if b_mode else 0, ws.stride(1) if b_mode == 2 else 0,
        B_MODE=b_mode, BN=bn, BK=bk, BLOCK_M=block_m, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        USE_DOT=cfg.use_dot, PARTIAL=partial, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if partial:
        reduce_n = 512
        _splitk_reduce_kernel[(m, triton.cdiv(n, reduce_n))](
            dst, out, ws, n, split, dst.stride(0), dst.stride(1), out.stride(0), ws.stride(0) if b_mode else 0,
            B_MODE=b_mode, BLOCK_N=reduce_n, num_warps=4,
        )  # fmt: skip
    return out


# ---- flashinfer's block-scaled GEMM (DeepGEMM), where measured faster ----


@functools.cache
def _flashinfer_block_fn():
    try:
        from flashinfer.gemm import fp8_blockscale_gemm_sm90
    except ImportError:
        return None
    return fp8_blockscale_gemm_sm90


def _use_flashinfer_block(m: int, x: torch.Tensor, weight: torch.Tensor, input_scale: torch.Tensor | None) -> bool:
    return (
        FLASHINFER_BLOCK_MIN_ROWS is not None
        and m >= FLASHINFER_BLOCK_MIN_ROWS
        and input_scale is None
        and x.is_cuda
        and x.dtype == torch.bfloat16
        and _capability(x.device.index or 0) == (9, 0)
        and weight.shape[1] % 128 == 0
        and weight.shape[0] % 64 == 0
        and _flashinfer_block_fn() is not None
    )


def _flashinfer_block(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, out_dtype) -> torch.Tensor:
    """flashinfer quantizes x per 1x128 group itself and takes 128x128 weight blocks ([N/128, K/128] float32)."""
    fn = _flashinfer_block_fn()
    return fn(x, weight, None, weight_scale.to(torch.float32), out_dtype=out_dtype)


# ---- Triton kernels ----

if triton is not None:

    @triton.jit
    def _w8a8_kernel(
        a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K,
        stride_am, stride_bn, stride_cm, stride_asm, stride_asg, stride_bsn, stride_bsk,
        A_MODE: tl.constexpr, B_MODE: tl.constexpr, BN: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        EVEN_K: tl.constexpr,
    ):  # fmt: skip
        """C = (A * sa) @ (B * sb)^T, A [M, K] and B [N, K] float8, both K-contiguous.
        A_MODE: 0 one scale, 1 per row [M, 1], 2 per row and BLOCK_K-column group [M, K/BLOCK_K].
        B_MODE: 0 one scale, 1 per output channel [N], 2 per BN x BLOCK_K block [N/BN, K/BLOCK_K].
        Group / block scales multiply each BLOCK_K-deep partial product in float32; the others the final sum."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        rows = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % rows
        pid_n = (pid % per_group) // rows
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        rm_safe = tl.where(m_ok, rm, 0).to(tl.int64)  # clamped rows/columns: unmasked loads on the even path
        rn_safe = tl.where(n_ok, rn, 0).to(tl.int64)
        rk = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rm_safe[:, None] * stride_am + rk[None, :]
        b_ptrs = b_ptr + rn_safe[None, :] * stride_bn + rk[:, None]
        if A_MODE == 2:
            as_ptrs = as_ptr + rm_safe * stride_asm
        if B_MODE == 2:
            bs_ptrs = bs_ptr + (rn_safe // BN) * stride_bsn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_ok = rk < K - g * BLOCK_K
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
            if A_MODE == 2 or B_MODE == 2:
                part = tl.dot(a, b)
                if A_MODE == 2:
                    part *= tl.load(as_ptrs + g * stride_asg)[:, None]
                if B_MODE == 2:
                    part *= tl.load(bs_ptrs + g * stride_bsk)[None, :]
                acc += part
            else:
                acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        if A_MODE == 0:
            acc *= tl.load(as_ptr)
        if A_MODE == 1:
            acc *= tl.load(as_ptr + rm_safe * stride_asm)[:, None]
        if B_MODE == 0:
            acc *= tl.load(bs_ptr)
        if B_MODE == 1:
            acc *= tl.load(bs_ptr + rn_safe * stride_bsn)[None, :]
        c_ptrs = c_ptr + rm_safe[:, None] * stride_cm + rn[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _w8a16_kernel(
        x_ptr, w_ptr, out_ptr, s_ptr, M, N, K, stride_xm, stride_wn, stride_om, stride_sn, stride_sk,
        B_MODE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """out = x @ (w * s)^T for M <= BLOCK_M rows: each program streams BLOCK_N weight rows once, converts each
        FP8 tile to x's dtype (exact) and multiplies on tensor cores; block scales scale each K step's partial
        product, per-tensor / per-channel ones the sum."""
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        n_ok = rn < N
        m_ok = rm < M
        rn_safe = tl.where(n_ok, rn, 0).to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            w = tl.load(w_ptr + rn_safe[None, :] * stride_wn + rk[:, None], mask=k_ok[:, None], other=0.0)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            part = tl.dot(x, w.to(x_ptr.dtype.element_ty))  # e4m3 values are exact in bf16 / fp16
            if B_MODE == 2:  # BLOCK_K divides BK: one block scale per column for this K step
                acc += part * tl.load(s_ptr + (rn_safe // BN) * stride_sn + (k0 // BK) * stride_sk)[None, :]
            else:
                acc += part
        if B_MODE == 0:
            acc *= tl.load(s_ptr)
        if B_MODE == 1:
            acc *= tl.load(s_ptr + rn_safe * stride_sn)[None, :]
        out = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], out, mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _splitk_kernel(
        x_ptr, w_ptr, out_ptr, s_ptr, M, N, K, K_PER_SPLIT, stride_xm, stride_wn, stride_om, stride_op,
        stride_sn, stride_sk,
        B_MODE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, PARTIAL: tl.constexpr,
    ):  # fmt: skip
        """Program (n tile, k split): BLOCK_N weight rows over K_PER_SPLIT columns times the M <= BLOCK_M rows of x.
        USE_DOT: each FP8 tile converted to x's dtype (exact) and multiplied on tensor cores (M padded to BLOCK_M
        >= 16); else float32 FMAs and a sum over K (few rows: no padding to 16). Block scales scale each K step's
        product; PARTIAL: float32 sums to out[split] (the reduce kernel scales), else scaled and rounded here."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        n_ok = rn < N
        m_ok = rm < M
        rn_safe = tl.where(n_ok, rn, 0).to(tl.int64)
        k_lo = pid_k * K_PER_SPLIT
        k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < k_hi
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if USE_DOT:
                w = tl.load(w_ptr + rn_safe[None, :] * stride_wn + rk[:, None], mask=k_ok[:, None], other=0.0)
                part = tl.dot(x, w.to(x_ptr.dtype.element_ty))  # e4m3 values are exact in bf16 / fp16
            else:
                w = tl.load(w_ptr + rn_safe[:, None] * stride_wn + rk[None, :], mask=k_ok[None, :], other=0.0)
                part = tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
            if B_MODE == 2:  # BLOCK_K divides BK and a split starts on a block edge: one scale per column here
                part = part * tl.load(s_ptr + (rn_safe // BN) * stride_sn + (k0 // BK) * stride_sk)[None, :]
            acc += part
        mask = m_ok[:, None] & n_ok[None, :]
        if PARTIAL:
            tl.store(out_ptr + pid_k * stride_op + rm[:, None] * stride_om + rn[None, :], acc, mask=mask)
        else:
            if B_MODE == 0:
                acc = acc * tl.load(s_ptr)
            if B_MODE == 1:
                acc = acc * tl.load(s_ptr + rn_safe * stride_sn)[None, :]
            tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _splitk_reduce_kernel(
        p_ptr, out_ptr, s_ptr, N, SPLIT, stride_p, stride_pm, stride_om, stride_sn,
        B_MODE: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """out[m, n] = scale * sum over splits of the partial sums p[split, m, n] (program: one row, BLOCK_N cols)."""
        row = tl.program_id(0)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = rn < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for s in range(0, SPLIT):
            acc += tl.load(p_ptr + s * stride_p + row * stride_pm + rn, mask=ok, other=0.0)
        if B_MODE == 0:
            acc = acc * tl.load(s_ptr)
        if B_MODE == 1:
            acc = acc * tl.load(s_ptr + tl.where(ok, rn, 0) * stride_sn, mask=ok, other=0.0)
        tl.store(out_ptr + row * stride_om + rn, acc.to(out_ptr.dtype.element_ty), mask=ok)
