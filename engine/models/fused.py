"""Fused elementwise kernels for CUDA tensors (Triton): RMSNorm (alone, after the residual add, and per head on
3-D views), rotary embedding of q and k (alone, or writing k and v into the paged KV cache too, either with
Qwen3's per-head q/k norm folded in; and DeepSeek's rope parts, optionally with the latent's norm and its cache
write), SiLU-and-mul; and DeepSeek's routing (grouped top-k).

Why: a decode step of a small batch is bound by kernel count, not bytes. In plain torch one layer is ~36
kernels (RMSNorm alone is 7, rotary 10), each ~2.5 us even inside a CUDA graph: ~3 ms of an 8B model's
~3.5 ms weight-read floor at batch 1. Each kernel here replaces 3-10 of those and, at prefill sizes, saves
the float32 intermediates' memory traffic. Numerics follow the torch path of `llama.py` (normalise in
float32, round to the model dtype, then scale); the torch ops stay the reference and the CPU path.

`enabled(x)`: CUDA tensor, Triton importable and the engine's fused_kernels on (--fused-kernels,
KUBELLM_FUSED_KERNELS). A kernel that fails (to compile or to launch) turns off only its own op: it logs one warning
naming the op, and that wrapper declines (None: the caller's torch path) for the rest of the process while every
other fused kernel stays on (`failed_ops()` lists the ops turned off). `make compile-check` (python -m
kubellm.engine.compile_check) compiles every kernel for sm90 without a GPU, so a compile error shows before a GPU run.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the torch path is used
    triton = None
    tl = None

# "rope_cache": rotary embedding and the KV write in one kernel (rope_cache; DeepSeek's mla_rope_cache with the
# latent's norm too); off, they run as rope + index_copy_ (the gpu tests compare the two paths; the engine's
# rope_cache setting, KUBELLM_ROPE_CACHE, switches it)
# "qk_norm": Qwen3's per-head q/k RMSNorm inside the rotary kernels (rope, rope_cache), or on its own through
# rms_norm's 3-D form; off, it runs as torch ops (the engine's fused_qk_norm setting, KUBELLM_FUSED_QK_NORM)
# "moe_sum_norm": a MoE layer's sum over its top-k expert outputs done by the next residual-add + RMSNorm kernel
# (sum_add_rms_norm); off, a torch.sum kernel per layer (the engine's moe_sum_norm setting, KUBELLM_MOE_SUM_NORM)
_state = {"ok": triton is not None, "rope_cache": True, "qk_norm": True, "moe_sum_norm": True}
# Launch shapes (bench/elementwise_micro.py sweeps them on a GPU): heads of one token per rotary program,
# (columns per program, warps) of SiLU-and-mul, warps of the norms (one row per program).
# Measured on 1x H200 at 16384 tokens (bench/results/elementwise-micro-2026-11-29.json): rotary 0.91 of copy
# bandwidth at 16 heads per program vs 0.20 at one; the rest sit at 0.96-0.98; all ~1.3-1.9 us at 1 token.
ROPE_HEADS_PER_PROGRAM = 16
SILU_MUL_CONFIG = (1024, 4)
RMS_NORM_WARPS = 4


def configure(on: bool, rope_cache: bool = True, qk_norm: bool = True, moe_sum_norm: bool = True) -> None:
    """The engine's fused_kernels setting (off: torch ops), its rope_cache, fused_qk_norm and moe_sum_norm
    settings."""
    _state["ok"] = triton is not None and on
    _state["rope_cache"] = rope_cache
    _state["qk_norm"] = qk_norm
    _state["moe_sum_norm"] = moe_sum_norm


def moe_sum_norm_enabled(x: torch.Tensor) -> bool:
    """Whether a MoE layer on x may leave its top-k sum to the next sum_add_rms_norm (`enabled`, switch on)."""
    return enabled(x) and _state["moe_sum_norm"]


def qk_norm_enabled(x: torch.Tensor) -> bool:
    """Whether Qwen3's q/k norms of x's attention take the fused kernels (`enabled` and fused_qk_norm on)."""
    return enabled(x) and _state["qk_norm"]


def enabled(x: torch.Tensor) -> bool:
    return _state["ok"] and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


# ops whose kernel failed in this process: their wrappers decline from then on, the others stay on
_failed: set[str] = set()


def failed_ops() -> frozenset[str]:
    """The fused ops turned off in this process because their kernel failed (empty when all run)."""
    return frozenset(_failed)


def _disable(op: str, e: Exception) -> None:
    """Turn off this op only (its wrapper returns None from now on, the caller takes torch ops); warn once."""
    if op in _failed:
        return
    _failed.add(op)
    logger.warning(
        "fused %s kernel failed (%s: %s); %s uses torch ops from now on (the other fused kernels stay on)",
        op, type(e).__name__, e, op,
    )  # fmt: skip


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, w_ptr, out_ptr, stride_x, stride_xh, stride_o, stride_oh, n_cols, eps, BLOCK: tl.constexpr
    ):  # fmt: skip
        # One program: one row (2-D input: axis 1 has one program) or one head of one token (3-D: [T, H, D]).
        row = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + head * stride_xh + cols, mask=mask, other=0.0).to(tl.float32)
        var = tl.sum(x * x, axis=0) / n_cols
        y = (x * tl.rsqrt(var + eps)).to(out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + head * stride_oh + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _head_norm(x1, x2, w_ptr, i, half, eps, HEAD_DIM: tl.constexpr, like_ptr):
        # Per-head RMSNorm of heads held as halves x1 = x[:, :half], x2 = x[:, half:] (float32, rows = heads), as
        # llama.py's RMSNorm computes it: float32 statistics, normalised value rounded to the model dtype (that of
        # like_ptr), times the weight, rounded again; returned as float32 for the rotary arithmetic that follows.
        dt = like_ptr.dtype.element_ty
        r = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM + eps)[:, None]
        w1 = tl.load(w_ptr + i, mask=i < half, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + half + i, mask=i < half, other=0.0).to(tl.float32)[None, :]
        y1 = (w1 * (x1 * r).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        y2 = (w2 * (x2 * r).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        return y1, y2

    @triton.jit
    def _add_norm_store(x, r, w_ptr, r_out_row, out_row, cols, mask, n_cols, eps):
        # One row's residual add and RMSNorm (x, r: float32 [BLOCK]): the residual stream x + r rounded as torch's
        # add rounds it, stored at r_out_row; its norm (float32 statistics, the normalised value rounded to the model
        # dtype, times the weight, rounded again) stored at out_row.
        h = (x + r).to(r_out_row.dtype.element_ty)
        tl.store(r_out_row + cols, h, mask=mask)
        hf = h.to(tl.float32)
        var = tl.sum(hf * hf, axis=0) / n_cols
        y = (hf * tl.rsqrt(var + eps)).to(out_row.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_row + cols, (w * y).to(out_row.dtype.element_ty), mask=mask)

    @triton.jit
    def _add_rms_norm_kernel(
        x_ptr, r_ptr, w_ptr, r_out_ptr, out_ptr, stride_x, stride_r, stride_ro, stride_o, n_cols, eps,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        _add_norm_store(x, r, w_ptr, r_out_ptr + row * stride_ro, out_ptr + row * stride_o, cols, mask, n_cols, eps)

    @triton.jit
    def _sum_add_rms_norm_kernel(
        p_ptr, e_ptr, r_ptr, w_ptr, r_out_ptr, out_ptr, stride_pt, stride_pk, stride_e, stride_r, stride_ro, stride_o,
        n_cols, eps, K: tl.constexpr, BLOCK: tl.constexpr, HAS_EXTRA: tl.constexpr,
    ):  # fmt: skip
        # _add_rms_norm_kernel whose x is the sum of K parts (a MoE layer's weighted expert outputs [T, K, n]):
        # summed in float32 in order and rounded to the model dtype, as torch.sum over them rounds it; HAS_EXTRA:
        # plus an extra [T, n] term (the shared experts' output), rounded as torch's add rounds it.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in tl.static_range(K):
            acc += tl.load(p_ptr + row * stride_pt + j * stride_pk + cols, mask=mask, other=0.0).to(tl.float32)
        x = acc.to(r_out_ptr.dtype.element_ty).to(tl.float32)
        if HAS_EXTRA:
            extra = tl.load(e_ptr + row * stride_e + cols, mask=mask, other=0.0).to(tl.float32)
            x = (x + extra).to(r_out_ptr.dtype.element_ty).to(tl.float32)
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        _add_norm_store(x, r, w_ptr, r_out_ptr + row * stride_ro, out_ptr + row * stride_o, cols, mask, n_cols, eps)

    @triton.jit
    def _rope_kernel(
        q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, qw_ptr, kw_ptr, stride_q, stride_k, stride_cs,
        n_q_heads, n_kv_heads, n_q_blocks, half, eps,
        HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, HEADS: tl.constexpr, NORM: tl.constexpr,
    ):  # fmt: skip
        # One program: HEADS heads of one token (q heads in the first n_q_blocks programs of axis 1, then k's);
        # NORM: each head RMSNormed first (Qwen3's q_norm / k_norm weights qw_ptr / kw_ptr).
        t = tl.program_id(0).to(tl.int64)
        hb = tl.program_id(1)
        if hb < n_q_blocks:
            src_base = q_ptr + t * stride_q
            dst_base = q_out_ptr + t * n_q_heads * HEAD_DIM
            h0 = hb * HEADS
            n_heads = n_q_heads
            w_ptr = qw_ptr
        else:
            src_base = k_ptr + t * stride_k
            dst_base = k_out_ptr + t * n_kv_heads * HEAD_DIM
            h0 = (hb - n_q_blocks) * HEADS
            n_heads = n_kv_heads
            w_ptr = kw_ptr
        heads = h0 + tl.arange(0, HEADS)
        i = tl.arange(0, BLOCK)
        c = tl.load(cos_ptr + t * stride_cs + i, mask=i < half, other=0.0).to(tl.float32)[None, :]
        s = tl.load(sin_ptr + t * stride_cs + i, mask=i < half, other=0.0).to(tl.float32)[None, :]
        mask = (heads < n_heads)[:, None] & (i < half)[None, :]
        offs = heads[:, None] * HEAD_DIM + i[None, :]
        x1 = tl.load(src_base + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src_base + offs + half, mask=mask, other=0.0).to(tl.float32)
        if NORM:
            x1, x2 = _head_norm(x1, x2, w_ptr, i, half, eps, HEAD_DIM, q_out_ptr)
        tl.store(dst_base + offs, (x1 * c - x2 * s).to(q_out_ptr.dtype.element_ty), mask=mask)
        tl.store(dst_base + offs + half, (x2 * c + x1 * s).to(q_out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_cache_kernel(
        q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slot_ptr, q_out_ptr, cache_ptr, qw_ptr, kw_ptr,
        stride_q, stride_k, stride_v, stride_cs, stride_row, n_q_heads, n_kv_heads, n_q_blocks, half, block_size, eps,
        HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, HEADS: tl.constexpr, NORM: tl.constexpr,
    ):  # fmt: skip
        # One program: HEADS heads of one token. The first n_q_blocks programs of axis 1 rotate q heads into q_out
        # (as _rope_kernel); the rest rotate k heads and copy the same v heads straight into the token's K and V
        # rows of the paged cache viewed as [num_blocks * 2 * block_size, Hkv, D] (stride_row apart).
        # NORM: q and k heads are RMSNormed (weights qw_ptr / kw_ptr) before they rotate, as in _rope_kernel.
        t = tl.program_id(0).to(tl.int64)
        hb = tl.program_id(1)
        i = tl.arange(0, BLOCK)
        c = tl.load(cos_ptr + t * stride_cs + i, mask=i < half, other=0.0).to(tl.float32)[None, :]
        s = tl.load(sin_ptr + t * stride_cs + i, mask=i < half, other=0.0).to(tl.float32)[None, :]
        if hb < n_q_blocks:
            heads = hb * HEADS + tl.arange(0, HEADS)
            mask = (heads < n_q_heads)[:, None] & (i < half)[None, :]
            offs = heads[:, None] * HEAD_DIM + i[None, :]
            src = q_ptr + t * stride_q
            dst = q_out_ptr + t * n_q_heads * HEAD_DIM
            x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(src + offs + half, mask=mask, other=0.0).to(tl.float32)
            if NORM:
                x1, x2 = _head_norm(x1, x2, qw_ptr, i, half, eps, HEAD_DIM, q_out_ptr)
            tl.store(dst + offs, (x1 * c - x2 * s).to(q_out_ptr.dtype.element_ty), mask=mask)
            tl.store(dst + offs + half, (x2 * c + x1 * s).to(q_out_ptr.dtype.element_ty), mask=mask)
        else:
            heads = (hb - n_q_blocks) * HEADS + tl.arange(0, HEADS)
            mask = (heads < n_kv_heads)[:, None] & (i < half)[None, :]
            offs = heads[:, None] * HEAD_DIM + i[None, :]
            slot = tl.load(slot_ptr + t)
            k_row = (slot // block_size) * (2 * block_size) + slot % block_size  # V's row is block_size further
            k_dst = cache_ptr + k_row * stride_row
            v_dst = k_dst + block_size * stride_row
            src = k_ptr + t * stride_k
            x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(src + offs + half, mask=mask, other=0.0).to(tl.float32)
            if NORM:
                x1, x2 = _head_norm(x1, x2, kw_ptr, i, half, eps, HEAD_DIM, cache_ptr)
            tl.store(k_dst + offs, (x1 * c - x2 * s).to(cache_ptr.dtype.element_ty), mask=mask)
            tl.store(k_dst + offs + half, (x2 * c + x1 * s).to(cache_ptr.dtype.element_ty), mask=mask)
            v_src = v_ptr + t * stride_v
            tl.store(v_dst + offs, tl.load(v_src + offs, mask=mask), mask=mask)
            tl.store(v_dst + offs + half, tl.load(v_src + offs + half, mask=mask), mask=mask)

    @triton.jit
    def _mla_rope_lanes(cos_ptr, sin_ptr, t, stride_cs, HALF: tl.constexpr, INTERLEAVE: tl.constexpr):
        # DeepSeek's rotary lanes of token t: (lane index i, the pair's two columns lo/hi, cos and sin [1, HALF]).
        i = tl.arange(0, HALF)
        if INTERLEAVE:  # pairs (x[2j], x[2j+1])
            lo, hi = 2 * i, 2 * i + 1
        else:  # halves (x[j], x[j + HALF])
            lo, hi = i, i + HALF
        c = tl.load(cos_ptr + t * stride_cs + i).to(tl.float32)[None, :]
        s = tl.load(sin_ptr + t * stride_cs + i).to(tl.float32)[None, :]
        return i, lo, hi, c, s

    @triton.jit
    def _rotate_store(src, dst, lo, hi, c, s, mask, like_ptr):
        # Rows of pointers src/dst [R, 1]: each row's (lo, hi) column pairs rotated by (c, s) in float32, stored
        # rounded to like_ptr's element type.
        x1 = tl.load(src + lo[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + hi[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dst + lo[None, :], (x1 * c - x2 * s).to(like_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + hi[None, :], (x2 * c + x1 * s).to(like_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _mla_rope_kernel(
        q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, stride_qt, stride_qh, stride_kt, stride_cs,
        n_heads, n_q_blocks,
        HALF: tl.constexpr, HEADS: tl.constexpr, INTERLEAVE: tl.constexpr,
    ):  # fmt: skip
        # One program: HEADS query heads of one token (axis 1 < n_q_blocks), or that token's one rope key.
        t = tl.program_id(0).to(tl.int64)
        hb = tl.program_id(1)
        i, lo, hi, c, s = _mla_rope_lanes(cos_ptr, sin_ptr, t, stride_cs, HALF, INTERLEAVE)
        is_q = hb < n_q_blocks
        heads = tl.where(is_q, hb * HEADS, 0) + tl.arange(0, HEADS)
        mask = (heads < tl.where(is_q, n_heads, 1))[:, None] & (i < HALF)[None, :]
        rows = heads[:, None].to(tl.int64)
        if is_q:
            src = q_ptr + t * stride_qt + rows * stride_qh
            dst = q_out_ptr + (t * n_heads + rows) * (2 * HALF)
        else:
            src = k_ptr + t * stride_kt + rows * 0
            dst = k_out_ptr + t * (2 * HALF) + rows * 0
        _rotate_store(src, dst, lo, hi, c, s, mask, q_out_ptr)

    @triton.jit
    def _mla_rope_cache_kernel(
        q_ptr, k_ptr, lat_ptr, lw_ptr, cos_ptr, sin_ptr, slot_ptr, q_out_ptr, cache_ptr,
        stride_qt, stride_qh, stride_kt, stride_lt, stride_cs, n_heads, n_q_blocks, rank, width, eps,
        HALF: tl.constexpr, HEADS: tl.constexpr, INTERLEAVE: tl.constexpr, RANK_BLOCK: tl.constexpr,
    ):  # fmt: skip
        # _mla_rope_kernel with the latent cache write folded in. One program: HEADS query heads of one token (axis
        # 1 < n_q_blocks), rotated into q_out as _mla_rope_kernel does; or that token's latent row: the rope key
        # rotated and the compressed KV RMSNormed (kv_a_layernorm, as _rms_norm_kernel computes it), both stored
        # straight into the token's row `slot` of the latent pool viewed as [num_blocks * block_size, width]
        # (columns [0, rank) the normed latent, [rank, width) the rotated key).
        t = tl.program_id(0).to(tl.int64)
        hb = tl.program_id(1)
        i, lo, hi, c, s = _mla_rope_lanes(cos_ptr, sin_ptr, t, stride_cs, HALF, INTERLEAVE)
        if hb < n_q_blocks:
            heads = hb * HEADS + tl.arange(0, HEADS)
            mask = (heads < n_heads)[:, None] & (i < HALF)[None, :]
            rows = heads[:, None].to(tl.int64)
            src = q_ptr + t * stride_qt + rows * stride_qh
            dst = q_out_ptr + (t * n_heads + rows) * (2 * HALF)
            _rotate_store(src, dst, lo, hi, c, s, mask, q_out_ptr)
        else:  # names of its own: Triton rejects a name bound to different types in the two branches
            row = cache_ptr + tl.load(slot_ptr + t) * width
            k_src = k_ptr + t * stride_kt
            k1 = tl.load(k_src + lo).to(tl.float32)[None, :]
            k2 = tl.load(k_src + hi).to(tl.float32)[None, :]
            tl.store(row + rank + lo[None, :], (k1 * c - k2 * s).to(cache_ptr.dtype.element_ty))
            tl.store(row + rank + hi[None, :], (k2 * c + k1 * s).to(cache_ptr.dtype.element_ty))
            cols = tl.arange(0, RANK_BLOCK)
            m = cols < rank
            x = tl.load(lat_ptr + t * stride_lt + cols, mask=m, other=0.0).to(tl.float32)
            var = tl.sum(x * x, axis=0) / rank
            y = (x * tl.rsqrt(var + eps)).to(cache_ptr.dtype.element_ty).to(tl.float32)
            w = tl.load(lw_ptr + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(row + cols, (w * y).to(cache_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)  # silu rounds, as torch does
        tl.store(out_ptr + row * stride_o + cols, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


if triton is not None:

    @triton.jit
    def _grouped_topk_kernel(
        logits_ptr, bias_ptr, w_ptr, ids_ptr, stride_l, n_group, group, scale,
        N_GROUP: tl.constexpr, GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
        SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr,
    ):  # fmt: skip
        # One program per token: scores, group limit, then K rounds of argmax over the experts still in play.
        # Experts sit in an [N_GROUP, GROUP] grid of powers of two (n_group groups of `group` real experts each,
        # padded with lanes that are never chosen): lane g * GROUP + j holds expert g * group + j.
        row = tl.program_id(0).to(tl.int64)
        lane = tl.arange(0, N_GROUP * GROUP)
        gi, ji = lane // GROUP, lane % GROUP
        real = (gi < n_group) & (ji < group)
        e = gi * group + ji
        x = tl.load(logits_ptr + row * stride_l + e, mask=real, other=float("-inf")).to(tl.float32)
        if SIGMOID:
            s = tl.where(real, 1.0 / (1.0 + tl.exp(-x)), 0.0)
        else:
            p = tl.exp(x - tl.max(x, axis=0))  # padded lanes: exp(-inf) = 0
            s = p / tl.sum(p, axis=0)
        choice = s
        if HAS_BIAS:
            choice = s + tl.load(bias_ptr + e, mask=real, other=0.0).to(tl.float32)
        choice = tl.where(real, choice, float("-inf"))
        if TOPK_GROUP < N_GROUP:
            g = tl.reshape(choice, (N_GROUP, GROUP))
            col = tl.arange(0, GROUP)[None, :]
            best = tl.max(g, axis=1)
            if SIGMOID:  # a group scores its two best (biased) experts
                first = tl.argmax(g, axis=1)
                second = tl.max(tl.where(col == first[:, None], float("-inf"), g), axis=1)
                score = best + second
            else:  # its best expert
                score = best
            gid = tl.arange(0, N_GROUP)
            score = tl.where(gid < n_group, score, float("-inf"))  # padding groups are never kept
            keep = gid < 0
            for _ in tl.static_range(TOPK_GROUP):
                j = tl.argmax(score, axis=0)
                keep = keep | (gid == j)
                score = tl.where(gid == j, float("-inf"), score)
            g = tl.where(keep[:, None], g, float("-inf"))
            choice = tl.reshape(g, (N_GROUP * GROUP,))
        slot = tl.arange(0, K_PAD)
        ids = tl.zeros((K_PAD,), dtype=tl.int32)
        weights = tl.zeros((K_PAD,), dtype=tl.float32)
        for i in tl.static_range(K):
            j = tl.argmax(choice, axis=0)
            ids = tl.where(slot == i, tl.sum(tl.where(lane == j, e, 0), axis=0), ids)
            weights = tl.where(slot == i, tl.sum(tl.where(lane == j, s, 0.0), axis=0), weights)
            choice = tl.where(lane == j, float("-inf"), choice)
        if RENORMALIZE:
            weights = weights / (tl.sum(weights, axis=0) + 1e-20)
        tl.store(w_ptr + row * K + slot, weights * scale, mask=slot < K)
        tl.store(ids_ptr + row * K + slot, ids, mask=slot < K)


def grouped_topk(
    router_logits: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    sigmoid: bool,
    correction_bias: torch.Tensor | None,
    renormalize: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """DeepSeek's routing in one launch (models/deepseek.py's deepseek_topk is the reference): softmax or sigmoid
    scores, the experts of the `topk_group` best of `n_group` groups (a group scored by its best expert, or with
    sigmoid by its two best biased scores), the top_k by (biased) score, their unbiased scores optionally
    renormalised, times `scale`. Returns (weights [T, k] float32, ids [T, k] int32), or None where it does not
    apply (groups that do not split the experts evenly, more than 4096 padded expert lanes, or k beyond the
    experts). Expert counts need not be powers of two (DeepSeek-V2's 160, Kimi-K2's 384): lanes are padded."""
    t, n_experts = router_logits.shape
    n_group = max(n_group, 1)
    group = n_experts // n_group
    if "grouped_topk" in _failed or not grouped_topk_applies(t, n_experts, n_group, top_k, topk_group):
        return None
    if router_logits.stride(1) != 1:
        return None
    try:
        weights = torch.empty((t, top_k), dtype=torch.float32, device=router_logits.device)
        ids = torch.empty((t, top_k), dtype=torch.int32, device=router_logits.device)
        bias = correction_bias if correction_bias is not None else weights  # never read without HAS_BIAS
        _grouped_topk_kernel[(t,)](
            router_logits, bias, weights, ids, router_logits.stride(0), n_group, group, scale,
            N_GROUP=triton.next_power_of_2(n_group), GROUP=triton.next_power_of_2(group),
            TOPK_GROUP=min(max(topk_group, 1), n_group), K=top_k, K_PAD=triton.next_power_of_2(top_k),
            SIGMOID=sigmoid, HAS_BIAS=correction_bias is not None, RENORMALIZE=renormalize, num_warps=4,
        )  # fmt: skip
        return weights, ids
    except Exception as e:
        _disable("grouped_topk", e)
        return None


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


GROUPED_TOPK_MAX_LANES = 4096  # padded experts one program holds in registers


def grouped_topk_applies(tokens: int, n_experts: int, n_group: int, top_k: int, topk_group: int | None = None) -> bool:
    """Whether `grouped_topk` takes this routing shape (pure logic, checked on the CPU too): groups split the
    experts evenly, the padded grid fits one program, 1 <= top_k <= the experts of the `topk_group` groups kept
    (None: all; past them the kernel's argmax would pick the same masked lane again and again, where
    deepseek_topk takes distinct masked experts)."""
    if tokens == 0 or n_group < 1 or n_experts % n_group or not 1 <= top_k <= n_experts:
        return False
    kept = n_group if topk_group is None else min(max(topk_group, 1), n_group)
    if top_k > kept * (n_experts // n_group):
        return False
    return _pow2(n_group) * _pow2(n_experts // n_group) <= GROUPED_TOPK_MAX_LANES


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm over the last axis of x: 2-D [T, n] rows, or 3-D [T, H, n] heads (Qwen3's q_norm / k_norm on the
    strided views of the qkv output), any row and head strides with the last axis contiguous; the result is a new
    contiguous tensor. None when the fused kernel does not apply."""
    if "rms_norm" in _failed or x.dim() not in (2, 3) or x.stride(-1) != 1 or x.shape[0] == 0 or x.shape[-1] == 0:
        return None
    if x.dim() == 3 and not _state["qk_norm"]:  # the per-head form answers to the fused_qk_norm switch
        return None
    try:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        n = x.shape[-1]
        heads = x.shape[1] if x.dim() == 3 else 1
        head_strides = (x.stride(1), out.stride(1)) if x.dim() == 3 else (0, 0)
        _rms_norm_kernel[(x.shape[0], heads)](
            x, weight, out, x.stride(0), head_strides[0], out.stride(0), head_strides[1], n, eps,
            BLOCK=triton.next_power_of_2(n), num_warps=RMS_NORM_WARPS,
        )  # fmt: skip
        return out
    except Exception as e:  # any compile or launch failure falls back to torch
        _disable("rms_norm", e)
        return None


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(residual + x, RMSNorm(residual + x)) in one kernel: the residual add that ends each attention and MLP
    block and the norm that starts the next one. None when the fused kernel does not apply."""
    if "add_rms_norm" in _failed:
        return None
    if x.dim() != 2 or x.shape != residual.shape or x.stride(-1) != 1 or residual.stride(-1) != 1 or not len(x):
        return None
    try:
        res_out = torch.empty(x.shape, dtype=residual.dtype, device=x.device)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        n = x.shape[1]
        _add_rms_norm_kernel[(x.shape[0],)](
            x, residual, weight, res_out, out, x.stride(0), residual.stride(0), res_out.stride(0), out.stride(0),
            n, eps, BLOCK=triton.next_power_of_2(n), num_warps=RMS_NORM_WARPS,
        )  # fmt: skip
        return res_out, out
    except Exception as e:
        _disable("add_rms_norm", e)
        return None


QkNorm = tuple[torch.Tensor, torch.Tensor, float]
"""Per-head RMSNorm of q and k before the rotary embedding (Qwen3, Qwen3-MoE): (q_norm weight [D], k_norm weight
[D], eps), the weights in the model dtype."""


def qk_norm_applies(qk_norm: QkNorm | None, q: torch.Tensor, d: int) -> bool:
    """Whether the rotary kernels can fold in this per-head norm: none asked, or weights of [D] in q's dtype (the
    torch path's rounding), contiguous, on q's device. Pure logic (no kernel), so the CPU tests check it."""
    if qk_norm is None:
        return True
    qw, kw, _ = qk_norm
    return all(
        tuple(w.shape) == (d,) and w.dtype == q.dtype and w.stride(0) == 1 and w.device == q.device for w in (qw, kw)
    )


def sum_add_rms_norm(
    parts: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    extra: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`add_rms_norm` of x = parts.sum(1) (+ extra): a MoE layer's k weighted expert outputs [T, k, n] (fused_moe's
    fused_experts(reduce=False)), and its shared experts' output [T, n] where it has them, summed in the same
    kernel as the residual add and the next block's norm, so the layer's torch.sum (and add) kernels are gone.
    None where it does not apply or the engine's moe_sum_norm setting is off."""
    if "sum_add_rms_norm" in _failed or not sum_add_rms_norm_applies(parts, residual, weight, extra):
        return None
    try:
        t, k, n = parts.shape
        res_out = torch.empty((t, n), dtype=residual.dtype, device=residual.device)
        out = torch.empty((t, n), dtype=residual.dtype, device=residual.device)
        e = extra if extra is not None else residual  # never read without HAS_EXTRA
        _sum_add_rms_norm_kernel[(t,)](
            parts, e, residual, weight, res_out, out, parts.stride(0), parts.stride(1), e.stride(0),
            residual.stride(0), res_out.stride(0), out.stride(0), n, eps, K=k, BLOCK=triton.next_power_of_2(n),
            HAS_EXTRA=extra is not None, num_warps=RMS_NORM_WARPS,
        )  # fmt: skip
        return res_out, out
    except Exception as e:
        _disable("sum_add_rms_norm", e)
        return None


SUM_PARTS_MAX = 16  # top-k terms one kernel sums (unrolled)


def sum_add_rms_norm_applies(
    parts: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, extra: torch.Tensor | None = None
) -> bool:
    """Pure shape logic of `sum_add_rms_norm` (checked on the CPU too): the switch on, parts [T, k, n] (k up to
    SUM_PARTS_MAX), residual (and extra) [T, n] of one dtype with contiguous rows, weight [n] contiguous."""
    if not _state["moe_sum_norm"] or parts.dim() != 3 or residual.dim() != 2:
        return False
    t, k, n = parts.shape
    return (
        t > 0
        and 1 <= k <= SUM_PARTS_MAX
        and tuple(residual.shape) == (t, n)
        and tuple(weight.shape) == (n,)
        and parts.dtype == residual.dtype
        and parts.stride(2) == 1
        and residual.stride(1) == 1
        and weight.is_contiguous()
        and (extra is None or (tuple(extra.shape) == (t, n) and extra.dtype == parts.dtype and extra.stride(1) == 1))
    )


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, qk_norm: QkNorm | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rotary embedding (HF rotate-half layout) of q [T, Hq, D] and k [T, Hkv, D] in one launch, into new
    contiguous tensors; cos/sin [T, 1, D] as llama.py builds them (their two halves are equal). With `qk_norm`
    each head is RMSNormed first, in the same launch (llama.py's q_norm / k_norm, rounded as they round)."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    if (
        "rope" in _failed
        or t == 0
        or q.stride(2) != 1
        or k.stride(2) != 1
        or q.stride(1) != d
        or k.stride(1) != d
        or d % 2
        or not qk_norm_applies(qk_norm, q, d)
    ):
        return None
    try:
        cos2, sin2 = cos.reshape(t, d), sin.reshape(t, d)
        q_out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
        k_out = torch.empty((t, hkv, d), dtype=k.dtype, device=k.device)
        half = d // 2
        heads = ROPE_HEADS_PER_PROGRAM
        n_q_blocks = triton.cdiv(hq, heads)
        qw, kw, eps = qk_norm if qk_norm is not None else (q, q, 0.0)  # weights never read without NORM
        _rope_kernel[(t, n_q_blocks + triton.cdiv(hkv, heads))](
            q, k, cos2, sin2, q_out, k_out, qw, kw, q.stride(0), k.stride(0), cos2.stride(0), hq, hkv, n_q_blocks,
            half, eps, HEAD_DIM=d, BLOCK=triton.next_power_of_2(half), HEADS=heads, NORM=qk_norm is not None,
        )  # fmt: skip
        return q_out, k_out
    except Exception as e:
        _disable("rope", e)
        return None


def rope_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor,
    slots: torch.Tensor,
    qk_norm: QkNorm | None = None,
) -> torch.Tensor | None:
    """`rope` with the KV write folded in: q [T, Hq, D] rotated into a new contiguous tensor (returned), k [T, Hkv,
    D] rotated and v [T, Hkv, D] copied straight into their rows of the paged cache kv_cache [num_blocks, 2,
    block_size, Hkv, D] (flashinfer's NHD layout, the model dtype) at `slots` [T] (block * block_size + offset,
    int64), in one launch: the rotated k never goes to memory on its own and the two index_copy_ kernels per layer
    are gone. q and the cache's K rows equal `rope`'s q and k bit for bit (the same float32 arithmetic), V rows v;
    with `qk_norm` too (q and k heads RMSNormed before they rotate, as `rope` does it: norm, rotary and KV write in
    one kernel). None where it does not apply (the caller rotates and lets the attention backend write) or when
    switched off."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    if (
        not _state["rope_cache"]
        or "rope_cache" in _failed
        or t == 0
        or d % 2
        or v.shape != k.shape
        or kv_cache.dim() != 5
        or tuple(kv_cache.shape[1:]) != (2, kv_cache.shape[2], hkv, d)
        or not kv_cache.is_contiguous()
        or not q.dtype == k.dtype == v.dtype == kv_cache.dtype
        or any(x.stride(2) != 1 or x.stride(1) != d for x in (q, k, v))
        or tuple(slots.shape) != (t,)
        or slots.dtype != torch.int64
        or tuple(cos.shape) != (t, 1, d)
        or not qk_norm_applies(qk_norm, q, d)
    ):
        return None
    try:
        cos2, sin2 = cos.reshape(t, d), sin.reshape(t, d)
        q_out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
        heads = ROPE_HEADS_PER_PROGRAM
        n_q_blocks = triton.cdiv(hq, heads)
        qw, kw, eps = qk_norm if qk_norm is not None else (q, q, 0.0)  # weights never read without NORM
        _rope_cache_kernel[(t, n_q_blocks + triton.cdiv(hkv, heads))](
            q, k, v, cos2, sin2, slots, q_out, kv_cache, qw, kw, q.stride(0), k.stride(0), v.stride(0),
            cos2.stride(0), hkv * d, hq, hkv, n_q_blocks, d // 2, kv_cache.shape[2], eps,
            HEAD_DIM=d, BLOCK=triton.next_power_of_2(d // 2), HEADS=heads, NORM=qk_norm is not None,
        )  # fmt: skip
        return q_out
    except Exception as e:
        _disable("rope_cache", e)
        return None


def mla_rope(
    q_rope: torch.Tensor, k_rope: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """DeepSeek's rotary embedding of the query heads' rope parts q_rope [T, H, R] (a strided view into the query
    projection) and the one shared rope key k_rope [T, R], in one launch, into new contiguous tensors; cos/sin
    [T, 1, R/2] as deepseek.py builds them; `interleave`: pairs (x0, x1), (x2, x3)... (rotate_pairs), else halves
    (rotate_half). Torch's version is ~14 kernels per layer, a decode step's worth of launch time at batch 1."""
    t, h, r = q_rope.shape
    half = r // 2
    if "mla_rope" in _failed or t == 0 or r % 2 or half & (half - 1) or q_rope.stride(2) != 1 or k_rope.stride(-1) != 1:
        return None
    try:
        cos2, sin2 = cos.reshape(t, half), sin.reshape(t, half)
        q_out = torch.empty((t, h, r), dtype=q_rope.dtype, device=q_rope.device)
        k_out = torch.empty((t, r), dtype=k_rope.dtype, device=k_rope.device)
        heads = ROPE_HEADS_PER_PROGRAM
        n_q_blocks = triton.cdiv(h, heads)
        _mla_rope_kernel[(t, n_q_blocks + 1)](
            q_rope, k_rope, cos2, sin2, q_out, k_out, q_rope.stride(0), q_rope.stride(1), k_rope.stride(0),
            cos2.stride(0), h, n_q_blocks, HALF=half, HEADS=heads, INTERLEAVE=interleave,
        )  # fmt: skip
        return q_out, k_out
    except Exception as e:
        _disable("mla_rope", e)
        return None


def mla_rope_cache(
    q_rope: torch.Tensor,
    k_rope: torch.Tensor,
    latent: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleave: bool,
    kv_cache: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor | None:
    """`mla_rope` with DeepSeek's latent cache write folded in: q_rope [T, H, R] rotated into a new contiguous
    tensor (returned); k_rope [T, R] rotated and the compressed KV latent [T, r] RMSNormed (kv_a_layernorm's weight
    [r] and eps) straight into their token's row of the latent pool kv_cache [num_blocks, block_size, r + R] (the
    model dtype) at `slots` [T] (int64). Replaces kv_a_layernorm, mla_rope, the backend's torch.cat and its
    index_copy_: four kernels per layer in one. q and the rope columns equal `mla_rope`'s bit for bit, the latent
    columns `rms_norm`'s arithmetic. None where it does not apply (the caller takes the unfused path) or when the
    engine's rope_cache setting is off."""
    t, h, r = q_rope.shape
    half = r // 2
    rank = latent.shape[-1] if latent.dim() == 2 else -1
    if (
        not _state["rope_cache"]
        or "mla_rope_cache" in _failed
        or t == 0
        or r % 2
        or half & (half - 1)
        or q_rope.stride(2) != 1
        or tuple(k_rope.shape) != (t, r)
        or k_rope.stride(1) != 1
        or tuple(latent.shape) != (t, rank)
        or latent.stride(1) != 1
        or tuple(norm_weight.shape) != (rank,)
        or not norm_weight.is_contiguous()
        or kv_cache.dim() != 3
        or kv_cache.shape[2] != rank + r
        or not kv_cache.is_contiguous()
        or not q_rope.dtype == k_rope.dtype == latent.dtype == norm_weight.dtype == kv_cache.dtype
        or tuple(slots.shape) != (t,)
        or slots.dtype != torch.int64
        or tuple(cos.shape) != (t, 1, half)
    ):
        return None
    try:
        cos2, sin2 = cos.reshape(t, half), sin.reshape(t, half)
        q_out = torch.empty((t, h, r), dtype=q_rope.dtype, device=q_rope.device)
        heads = ROPE_HEADS_PER_PROGRAM
        n_q_blocks = triton.cdiv(h, heads)
        _mla_rope_cache_kernel[(t, n_q_blocks + 1)](
            q_rope, k_rope, latent, norm_weight, cos2, sin2, slots, q_out, kv_cache, q_rope.stride(0),
            q_rope.stride(1), k_rope.stride(0), latent.stride(0), cos2.stride(0), h, n_q_blocks, rank, rank + r, eps,
            HALF=half, HEADS=heads, INTERLEAVE=interleave, RANK_BLOCK=triton.next_power_of_2(rank),
            num_warps=RMS_NORM_WARPS,
        )  # fmt: skip
        return q_out
    except Exception as e:
        _disable("mla_rope_cache", e)
        return None


def silu_mul(x: torch.Tensor) -> torch.Tensor | None:
    """silu(x[:, :n]) * x[:, n:] for x [T, 2n] (the fused gate_up output)."""
    if "silu_mul" in _failed or x.dim() != 2 or x.stride(-1) != 1 or x.shape[0] == 0:
        return None
    try:
        n = x.shape[1] // 2
        out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
        block, warps = SILU_MUL_CONFIG
        _silu_mul_kernel[(x.shape[0], triton.cdiv(n, block))](
            x, out, x.stride(0), out.stride(0), n, BLOCK=block, num_warps=warps
        )
        return out
    except Exception as e:
        _disable("silu_mul", e)
        return None
