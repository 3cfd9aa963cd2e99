"""Fused mixture-of-experts on CUDA, in Triton: top-k gating in one kernel, then the experts' SiLU-gated MLPs as
two grouped GEMMs over token-expert pairs sorted by expert.

Why this shape: a MoE layer at decode reads only the active experts' weights, so it is bound by their bytes, and
at prefill it is a batch of small GEMMs of uneven sizes. Both want one launch per GEMM over all experts, each
program owning a BLOCK_M-row tile of pairs that all go to one expert, so every expert's weights stream once per
tile and no dense E-wide compute happens.

The pipeline of `fused_experts` (five launches, or four when the pairs are few):
  1. align: count pairs per expert, pad each expert's count to a multiple of BLOCK_M, prefix-sum into each
     expert's slice of `sorted_pairs`, map every tile to its expert (-1 past the end), fill padding rows with a
     sentinel; for few pairs it also scatters them (2. otherwise).
  2. scatter: each pair takes the next slot of its expert's slice (an atomic cursor). The order within an
     expert is arbitrary, which changes nothing: a row's GEMM result does not depend on the other rows.
  3. gate_up: tile rows gather x by token, multiply by the expert's gate and up rows (w13 [:I] and [I:]) into
     two float32 accumulators and store silu(gate) * up in bf16/fp16 at the pair's row of an [T*k, I] buffer.
  4. down: the same over w2, scaled by the pair's top-k weight, stored at the pair's row of [T*k, H].
  5. the sum over each token's k rows (a torch sum, float32 accumulation); skipped when k = 1.
For a few tokens (a config's `direct`) steps 1-2 are skipped: each tile holds one pair, its expert read from
topk_ids, which costs two launches less than aligning and only re-reads an expert two tokens share; with
`fuse_sum` steps 4-5 become one token-major kernel that sums each token's k down projections in registers.
`align_pairs`, `gate_up`, `down` and `down_sum` are the stages, public so the autotune can time each alone.
Everything stays on the device and every buffer is sized by the worst case (T*k + E*(BLOCK_M-1) sorted rows),
from shapes only, so a decode step with this inside is CUDA-graph capturable: no `.item()`, no host sync, no
data-dependent shape. Programs of tiles past the real end exit at once.

Tile configs (BLOCK_M shared by both GEMMs, BLOCK_N/K, GROUP_M, warps, stages per GEMM) come from
engine/models/moe_configs/*.json written by bench/moe_autotune.py, keyed by GPU name, E, N (= I of the shard),
H and dtype, one entry per batch-size bucket; unseen shapes get `default_config`.

Imports on CPU-only installs without Triton; calling a kernel there raises a clear error.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import fp8_quant

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs
    triton = None
    tl = None

CONFIG_DIR = Path(__file__).parent / "moe_configs"
DIRECT_MAX_TOKENS = 1  # default configs skip the alignment up to this batch (the autotune decides per shape)
INLINE_SCATTER_MAX_PAIRS = 1024  # up to this many pairs the align kernel also scatters them (one launch fewer)


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch parameters of one grouped GEMM."""

    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class MoeConfig:
    """BLOCK_M (the alignment of each expert's rows, shared by both GEMMs), each GEMM's tiling, and whether
    to skip the alignment (direct: one pair per 16-row tile)."""

    block_m: int
    up: GemmConfig
    down: GemmConfig
    direct: bool = False
    fuse_sum: bool = False  # direct only: `down` tiles the token-major down_sum kernel (no per-pair rows, no sum)

    def to_json(self) -> dict:
        return {"BLOCK_M": self.block_m, "DIRECT": self.direct, "FUSE_SUM": self.fuse_sum,
                "up": asdict(self.up), "down": asdict(self.down)}  # fmt: skip

    @classmethod
    def from_json(cls, d: dict) -> MoeConfig:
        up, down = GemmConfig(**d["up"]), GemmConfig(**d["down"])
        return cls(d["BLOCK_M"], up, down, d.get("DIRECT", False), d.get("FUSE_SUM", False))


def available() -> bool:
    """Whether the kernels can run here (Triton importable); callers still need CUDA tensors."""
    return triton is not None


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("the fused MoE kernels need Triton (`pip install triton`), which is not installed")


def _check_cuda(name: str, t: torch.Tensor) -> None:
    # Triton's interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors: how their logic is checked off-GPU
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"fused MoE: {name} must be on a CUDA device, got {t.device}")


if triton is not None:
    from .fp8_quant import dynamic_scale, quantize_values

    @triton.jit(do_not_specialize=["T"])
    def _topk_softmax_kernel(
        logits_ptr, weights_ptr, ids_ptr, T, E, stride_lt,
        TOP_K: tl.constexpr, K_PAD: tl.constexpr, RENORMALIZE: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    ):  # fmt: skip
        rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        re_ = tl.arange(0, BLOCK_E)
        t_ok = rt < T
        e_ok = re_ < E
        x = tl.load(
            logits_ptr + rt[:, None].to(tl.int64) * stride_lt + re_[None, :],
            mask=t_ok[:, None] & e_ok[None, :],
            other=float("-inf"),
        ).to(tl.float32)
        x = tl.where(t_ok[:, None], x, 0.0)  # rows past T: finite, never stored
        p = tl.exp(x - tl.max(x, axis=1)[:, None])
        p = p / tl.sum(p, axis=1)[:, None]
        p = tl.where(e_ok[None, :], p, -1.0)  # padding experts are never picked
        rk = tl.arange(0, K_PAD)
        top_w = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
        top_i = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int32)
        for j in tl.static_range(TOP_K):
            best = tl.max(p, axis=1)
            idx = tl.min(tl.where(p == best[:, None], re_[None, :], BLOCK_E), axis=1)  # lowest index on ties
            top_w = tl.where(rk[None, :] == j, best[:, None], top_w)
            top_i = tl.where(rk[None, :] == j, idx[:, None], top_i)
            p = tl.where(re_[None, :] == idx[:, None], -1.0, p)
        if RENORMALIZE:
            top_w = top_w / tl.sum(top_w, axis=1)[:, None]
        out = rt[:, None] * TOP_K + rk[None, :]
        ok = t_ok[:, None] & (rk[None, :] < TOP_K)
        tl.store(weights_ptr + out, top_w, mask=ok)
        tl.store(ids_ptr + out, top_i, mask=ok)

    @triton.jit(do_not_specialize=["num_pairs", "max_len", "max_tiles"])
    def _align_kernel(
        ids_ptr, sorted_ptr, tile_expert_ptr, cursor_ptr, num_pairs, E, max_len, max_tiles,
        BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr, TILE_CHUNK: tl.constexpr,
        SCATTER: tl.constexpr,
    ):  # fmt: skip
        re_ = tl.arange(0, BLOCK_E)
        e_ok = re_ < E
        counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
        for start in range(0, num_pairs, CHUNK):
            r = start + tl.arange(0, CHUNK)
            ids = tl.load(ids_ptr + r, mask=r < num_pairs, other=BLOCK_E - 1)  # bin BLOCK_E-1 >= E: not an expert
            counts += tl.histogram(ids, BLOCK_E)
        counts = tl.where(e_ok, counts, 0)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        ends = tl.cumsum(padded, axis=0)
        total = tl.sum(padded, axis=0)
        tl.store(cursor_ptr + re_, ends - padded, mask=e_ok)
        for start in range(0, max_len, CHUNK):
            r = start + tl.arange(0, CHUNK)
            tl.store(sorted_ptr + r, tl.full((CHUNK,), 0, tl.int32) + num_pairs, mask=r < max_len)
        for start in range(0, max_tiles, TILE_CHUNK):
            tiles = start + tl.arange(0, TILE_CHUNK)
            row = tiles * BLOCK_M
            # the expert owning `row` is the number of experts whose slice ends at or before it
            expert = tl.sum(((ends[None, :] <= row[:, None]) & e_ok[None, :]).to(tl.int32), axis=1)
            tl.store(tile_expert_ptr + tiles, tl.where(row < total, expert, -1), mask=tiles < max_tiles)
        if SCATTER:
            tl.debug_barrier()  # cursor and sentinel stores above are visible to every thread below
            for start in range(0, num_pairs, CHUNK):
                r = start + tl.arange(0, CHUNK)
                ok = r < num_pairs
                ids = tl.load(ids_ptr + r, mask=ok, other=0)
                pos = tl.atomic_add(cursor_ptr + ids, 1, mask=ok)
                tl.store(sorted_ptr + pos, r, mask=ok)

    @triton.jit(do_not_specialize=["num_pairs"])
    def _scatter_kernel(ids_ptr, sorted_ptr, cursor_ptr, num_pairs, CHUNK: tl.constexpr):
        r = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
        ok = r < num_pairs
        ids = tl.load(ids_ptr + r, mask=ok, other=0)
        pos = tl.atomic_add(cursor_ptr + ids, 1, mask=ok)
        tl.store(sorted_ptr + pos, r, mask=ok)

    @triton.jit
    def _tile_coords(pid, max_tiles, N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """Program id -> (tile, column block), GROUP_M tiles side by side so neighbours share weight blocks in L2."""
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        rows = tl.minimum(max_tiles - first_m, GROUP_M)
        return first_m + (pid % per_group) % rows, (pid % per_group) // rows

    @triton.jit(do_not_specialize=["num_pairs", "max_tiles", "top_k"])
    def _gate_up_kernel(
        x_ptr, w_ptr, out_ptr, sorted_ptr, tile_expert_ptr, num_pairs, N, K, max_tiles,
        stride_xt, stride_we, stride_wn, stride_ot, top_k,
        as_ptr, ws_ptr, stride_as, stride_wse, stride_wsn, stride_wsk, qs_ptr, stride_qs, min_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, DIRECT: tl.constexpr,
        QUANT: tl.constexpr = 0, BN: tl.constexpr = 128, BK: tl.constexpr = 128,
        QUANT_OUT: tl.constexpr = False, ROUND_TO: tl.constexpr = tl.bfloat16, QMAX: tl.constexpr = 448.0,
    ):  # fmt: skip
        """QUANT 0: x and w13 in bf16/fp16. FP8 x and w13: 1 scales applied to the sums, x's per token row (stride_as
        0: one for the tensor) and w13's per output row of each expert (stride_wsn 0: one per expert); 2 block
        scales (x's per token and BK-column group, w13's per BN x BK block) applied to each BLOCK_K-deep partial
        product (BLOCK_K divides BK). QUANT_OUT: the activation leaves as FP8 with one scale per row of the tile
        (BLOCK_N columns are one group of the down GEMM's input) at qs_ptr [pairs, N / BLOCK_N], quantized from
        its ROUND_TO rounding exactly as fp8_quant.quantize would quantize the stored activation."""
        pid_m, pid_n = _tile_coords(tl.program_id(0), max_tiles, N, BLOCK_N, GROUP_M)
        expert = tl.load(tile_expert_ptr + pid_m)
        if DIRECT:  # one pair per tile, tile_expert_ptr is topk_ids itself: no alignment pass at all
            pair = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, num_pairs)
        else:
            if expert < 0:
                return
            pair = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        m_ok = pair < num_pairs
        token = (pair // top_k).to(tl.int64)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        rk = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + token[:, None] * stride_xt + rk[None, :]
        g_ptrs = w_ptr + expert.to(tl.int64) * stride_we + rn[None, :].to(tl.int64) * stride_wn + rk[:, None]
        u_ptrs = g_ptrs + N * stride_wn
        if QUANT == 2:
            as_row = as_ptr + token * stride_as
            gs_row = ws_ptr + expert.to(tl.int64) * stride_wse + (rn // BN) * stride_wsn
            us_row = ws_ptr + expert.to(tl.int64) * stride_wse + ((N + rn) // BN) * stride_wsn
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
                g = tl.load(g_ptrs, mask=n_ok[None, :], other=0.0)
                u = tl.load(u_ptrs, mask=n_ok[None, :], other=0.0)
            else:
                k_ok = rk < K - k0
                a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                g = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                u = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if QUANT == 2:
                sa = tl.load(as_row + (k0 // BK), mask=m_ok, other=0.0)[:, None]
                kb = (k0 // BK) * stride_wsk
                acc_g += tl.dot(a, g) * sa * tl.load(gs_row + kb, mask=n_ok, other=0.0)[None, :]
                acc_u += tl.dot(a, u) * sa * tl.load(us_row + kb, mask=n_ok, other=0.0)[None, :]
            else:
                acc_g = tl.dot(a, g, acc_g)
                acc_u = tl.dot(a, u, acc_u)
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
        if QUANT == 1:
            sa = tl.load(as_ptr + token * stride_as, mask=m_ok, other=0.0)[:, None]
            w_row = ws_ptr + expert.to(tl.int64) * stride_wse
            acc_g *= sa * tl.load(w_row + rn * stride_wsn, mask=n_ok, other=0.0)[None, :]
            acc_u *= sa * tl.load(w_row + (N + rn) * stride_wsn, mask=n_ok, other=0.0)[None, :]
        h = acc_g * tl.sigmoid(acc_g) * acc_u
        o_ptrs = out_ptr + pair[:, None].to(tl.int64) * stride_ot + rn[None, :]
        if QUANT_OUT:
            h = h.to(ROUND_TO).to(tl.float32)
            scale = dynamic_scale(tl.max(tl.abs(h), axis=1), min_scale, QMAX)
            h = quantize_values(h, scale[:, None], QMAX)
            tl.store(qs_ptr + pair.to(tl.int64) * stride_qs + pid_n, scale, mask=m_ok)
        tl.store(o_ptrs, h.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit(do_not_specialize=["num_pairs", "max_tiles"])
    def _down_kernel(
        a_ptr, w_ptr, out_ptr, sorted_ptr, tile_expert_ptr, weights_ptr, num_pairs, N, K, max_tiles,
        stride_at, stride_we, stride_wn, stride_ot,
        as_ptr, ws_ptr, stride_as, stride_wse, stride_wsn, stride_wsk,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        EVEN_K: tl.constexpr, DIRECT: tl.constexpr,
        QUANT: tl.constexpr = 0, BN: tl.constexpr = 128, BK: tl.constexpr = 128,
    ):  # fmt: skip
        """QUANT as in _gate_up_kernel; the input rows are the pairs' activations (scales per pair row)."""
        pid_m, pid_n = _tile_coords(tl.program_id(0), max_tiles, N, BLOCK_N, GROUP_M)
        expert = tl.load(tile_expert_ptr + pid_m)
        if DIRECT:  # one pair per tile, tile_expert_ptr is topk_ids itself: no alignment pass at all
            pair = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, num_pairs)
        else:
            if expert < 0:
                return
            pair = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        m_ok = pair < num_pairs
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        rk = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + pair[:, None].to(tl.int64) * stride_at + rk[None, :]
        w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + rn[None, :].to(tl.int64) * stride_wn + rk[:, None]
        if QUANT == 2:
            as_row = as_ptr + pair.to(tl.int64) * stride_as
            ws_row = ws_ptr + expert.to(tl.int64) * stride_wse + (rn // BN) * stride_wsn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
                w = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
            else:
                k_ok = rk < K - k0
                a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if QUANT == 2:
                sa = tl.load(as_row + (k0 // BK), mask=m_ok, other=0.0)[:, None]
                acc += tl.dot(a, w) * sa * tl.load(ws_row + (k0 // BK) * stride_wsk, mask=n_ok, other=0.0)[None, :]
            else:
                acc = tl.dot(a, w, acc)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if QUANT == 1:
            sa = tl.load(as_ptr + pair.to(tl.int64) * stride_as, mask=m_ok, other=0.0)[:, None]
            acc *= (
                sa * tl.load(ws_ptr + expert.to(tl.int64) * stride_wse + rn * stride_wsn, mask=n_ok, other=0.0)[None, :]
            )
        acc *= tl.load(weights_ptr + pair, mask=m_ok, other=0.0)[:, None]
        o_ptrs = out_ptr + pair[:, None].to(tl.int64) * stride_ot + rn[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


if triton is not None:

    @triton.jit
    def _down_sum_kernel(
        a_ptr, w_ptr, out_ptr, ids_ptr, weights_ptr, N, stride_at, stride_we, stride_wn, stride_ot,
        ws_ptr, stride_wse, stride_wsn, stride_wsk,
        K: tl.constexpr, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        QUANT: tl.constexpr = 0, BN: tl.constexpr = 128, BK: tl.constexpr = 128,
    ):  # fmt: skip
        """Down projection of one token's k pairs summed in registers (direct mode only): no per-pair rows, no
        separate sum. A weight-streaming GEMV on CUDA cores (one row: tensor-core tiles would be 1/16 used);
        K is a constexpr so the loops unroll and every load can be in flight at once. FP8 weights (QUANT 1, 2)
        are dequantized in registers (W8A16: the activations stay bf16); block scales need BLOCK_K | BK."""
        tok = tl.program_id(0)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            pair = tok * TOP_K + j
            expert = tl.load(ids_ptr + pair).to(tl.int64)
            weight = tl.load(weights_ptr + pair)
            a_row = a_ptr + pair.to(tl.int64) * stride_at
            w_base = w_ptr + expert * stride_we + rn[None, :].to(tl.int64) * stride_wn
            for k0 in tl.static_range(0, K, BLOCK_K):
                k_ok = rk < K - k0
                a = tl.load(a_row + k0 + rk, mask=k_ok, other=0.0).to(tl.float32) * weight
                w = tl.load(w_base + (k0 + rk)[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                w = w.to(tl.float32)
                if QUANT == 1:  # per output row of the expert (stride_wsn 0: one scale per expert)
                    w *= tl.load(ws_ptr + expert * stride_wse + rn * stride_wsn, mask=n_ok, other=0.0)[None, :]
                if QUANT == 2:
                    ws = ws_ptr + expert * stride_wse + (rn // BN) * stride_wsn + (k0 // BK) * stride_wsk
                    w *= tl.load(ws, mask=n_ok, other=0.0)[None, :]
                acc += w * a[:, None]
        out = tl.sum(acc, axis=0)
        tl.store(out_ptr + tok.to(tl.int64) * stride_ot + rn, out.to(out_ptr.dtype.element_ty), mask=n_ok)


def fused_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts in float32, the top_k largest, optionally renormalised to sum to 1: one kernel.

    Returns (weights [T, k] float32, ids [T, k] int32), largest first (lowest expert index first on ties)."""
    _require_triton()
    _check_cuda("router_logits", router_logits)
    if router_logits.dim() != 2:
        raise ValueError(f"fused_topk: router_logits must be [tokens, experts], got shape {tuple(router_logits.shape)}")
    t, e = router_logits.shape
    if not 1 <= top_k <= e:
        raise ValueError(f"fused_topk: top_k must be between 1 and the number of experts ({e}), got {top_k}")
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    weights = torch.empty((t, top_k), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((t, top_k), dtype=torch.int32, device=router_logits.device)
    if t == 0:
        return weights, ids
    block_e = triton.next_power_of_2(e)
    block_t = max(1, min(16, 4096 // block_e))
    _topk_softmax_kernel[(triton.cdiv(t, block_t),)](
        router_logits, weights, ids, t, e, router_logits.stride(0),
        TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), RENORMALIZE=renormalize, BLOCK_T=block_t, BLOCK_E=block_e,
        num_warps=4,
    )  # fmt: skip
    return weights, ids


@dataclass
class Alignment:
    """Pairs (token * k + slot) sorted by expert in BLOCK_M tiles: `sorted_pairs[i]` is a pair index or
    num_pairs (padding); `tile_expert[j]` the expert of tile j or -1 past the last tile. Direct: one pair per
    tile in pair order, `tile_expert` = the flat topk_ids (no kernel; for a handful of pairs, where an align
    launch costs more than reading an expert twice when two tokens share it)."""

    sorted_pairs: torch.Tensor
    tile_expert: torch.Tensor
    block_m: int
    num_pairs: int
    direct: bool = False


def max_sorted_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Worst case of padded rows: every expert's count rounded up to BLOCK_M."""
    return num_pairs + num_experts * (block_m - 1)


def align_pairs(topk_ids: torch.Tensor, num_experts: int, block_m: int, direct: bool = False) -> Alignment:
    """Sort token-expert pairs by expert into BLOCK_M-row tiles, on the device, with shape-only buffer sizes."""
    _require_triton()
    ids = topk_ids.reshape(-1)
    if ids.dtype != torch.int32:
        ids = ids.to(torch.int32)
    num_pairs = ids.numel()
    if direct:
        return Alignment(ids, ids, 16, num_pairs, direct=True)
    max_len = max_sorted_rows(num_pairs, num_experts, block_m)
    max_tiles = triton.cdiv(max_len, block_m)
    dev = ids.device
    sorted_pairs = torch.empty(max_len, dtype=torch.int32, device=dev)
    tile_expert = torch.empty(max_tiles, dtype=torch.int32, device=dev)
    cursor = torch.empty(num_experts, dtype=torch.int32, device=dev)
    inline = num_pairs <= INLINE_SCATTER_MAX_PAIRS
    _align_kernel[(1,)](
        ids, sorted_pairs, tile_expert, cursor, num_pairs, num_experts, max_len, max_tiles,
        BLOCK_M=block_m, BLOCK_E=triton.next_power_of_2(num_experts + 1), CHUNK=1024, TILE_CHUNK=32,
        SCATTER=inline, num_warps=8,
    )  # fmt: skip
    if not inline:
        _scatter_kernel[(triton.cdiv(num_pairs, 1024),)](ids, sorted_pairs, cursor, num_pairs, CHUNK=1024, num_warps=4)
    return Alignment(sorted_pairs, tile_expert, block_m, num_pairs)


@dataclass(frozen=True)
class Fp8Experts:
    """FP8 (e4m3) expert weights' scales and how activations are quantized for them.

    Per tensor or per channel: w13_scale [E] or [E, 2I], w2_scale [E] or [E, H] (one scale per expert, or per
    output row of each expert: a checkpoint's separate gate and up per-tensor scales spread over their rows need
    no requantization); activations per token (dynamic) or per tensor (static a13_scale / a2_scale, one number
    each). Block (block_size (bn, bk), DeepSeek's and Qwen3's 128x128 format): w13_scale [E, 2I/bn, ceil(H/bk)],
    w2_scale [E, ceil(H/bn), ceil(I/bk)], I a multiple of bn (gate and up rows never share a block), activations
    per token and bk-column group, dynamic only."""

    w13_scale: torch.Tensor
    w2_scale: torch.Tensor
    block_size: tuple[int, int] | None = None
    a13_scale: torch.Tensor | None = None
    a2_scale: torch.Tensor | None = None

    @property
    def quant(self) -> int:
        """The kernels' QUANT: 1 per tensor, 2 block."""
        return 2 if self.block_size is not None else 1

    def act_quant(self, static: torch.Tensor | None) -> fp8_quant.ActQuant:
        if self.block_size is not None:
            return fp8_quant.ActQuant("group", group=self.block_size[1])
        if static is not None:
            return fp8_quant.ActQuant("tensor", static_scale=static)
        return fp8_quant.ActQuant("token")  # one launch, row-local, tighter than a per-tensor scale

    def check(self, e: int, h: int, inter: int) -> None:
        if self.block_size is None:
            for name, t, rows in (("w1_scale", self.w13_scale, 2 * inter), ("w2_scale", self.w2_scale, h)):
                if t.numel() not in (e, e * rows):
                    raise ValueError(f"fused_experts: {name} must hold one scale per expert ([{e}]) or per output row "
                                     f"([{e}, {rows}]), got shape {tuple(t.shape)}")  # fmt: skip
            return
        bn, bk = self.block_size
        if self.a13_scale is not None or self.a2_scale is not None:
            raise ValueError("fused_experts: block-scaled FP8 experts take dynamic activation scales only")
        if inter % bn:
            raise ValueError(f"fused_experts: block-scaled experts need I ({inter}) to be a multiple of bn ({bn})")
        if bk < 32 or bk & (bk - 1):
            raise ValueError(f"fused_experts: the block's bk must be a power of two >= 32, got {bk}")
        want13, want2 = (e, 2 * inter // bn, -(-h // bk)), (e, -(-h // bn), -(-inter // bk))
        if tuple(self.w13_scale.shape) != want13 or tuple(self.w2_scale.shape) != want2:
            raise ValueError(
                f"fused_experts: block scales must be w1_scale {want13} and w2_scale {want2} for {bn}x{bk} blocks, "
                f"got {tuple(self.w13_scale.shape)} and {tuple(self.w2_scale.shape)}"
            )


def _check_experts_args(x, w13, w2, topk_weights, topk_ids, fp8: Fp8Experts | None) -> None:
    for name, t in (("x", x), ("w13", w13), ("w2", w2), ("topk_weights", topk_weights), ("topk_ids", topk_ids)):
        _check_cuda(name, t)
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"fused_experts: x must be bfloat16 or float16, got {x.dtype}")
    want = fp8_quant.FP8_DTYPE if fp8 is not None else x.dtype
    if w13.dtype != want or w2.dtype != want:
        what = "FP8 experts' weights must be" if fp8 is not None else "weights must have x's dtype"
        raise ValueError(f"fused_experts: {what} {want}, got w13 {w13.dtype}, w2 {w2.dtype}")
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError("fused_experts: expected x [T, H], w13 [E, 2I, H], w2 [E, H, I]")
    t, h = x.shape
    e, two_i, h13 = w13.shape
    if h13 != h or two_i % 2 or tuple(w2.shape) != (e, h, two_i // 2):
        raise ValueError(
            f"fused_experts: shapes do not fit: x {tuple(x.shape)}, w13 {tuple(w13.shape)} (want [E, 2I, {h}]), "
            f"w2 {tuple(w2.shape)} (want [{e}, {h}, {two_i // 2}])"
        )
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(
            f"fused_experts: topk_weights {tuple(topk_weights.shape)} and topk_ids {tuple(topk_ids.shape)} "
            f"must both be [{t}, k]"
        )
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"fused_experts: topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if not (w13.is_contiguous() and w2.is_contiguous()):
        raise ValueError("fused_experts: w13 and w2 must be contiguous")
    if fp8 is not None:
        fp8.check(e, h, two_i // 2)


def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    config: MoeConfig | None = None,
    *,
    w1_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    a1_scale: torch.Tensor | None = None,
    a2_scale: torch.Tensor | None = None,
    block_size: tuple[int, int] | None = None,
    reduce: bool = True,
) -> torch.Tensor:
    """sum_k w_k * (silu(x @ gate_e^T) * (x @ up_e^T)) @ w2_e^T, e = topk_ids[:, k]; gate = w13[e, :I], up = w13[e, I:].
    `reduce=False`: the k weighted terms unsummed, [T, k, H], where the path computes them apart (top_k > 1 and not
    the token-major down_sum), for a caller that sums them in a kernel of its own (models/fused.py's
    sum_add_rms_norm); else [T, H] as always.

    x [T, H] bf16/fp16, w13 [E, 2I, H], w2 [E, H, I] (x's dtype, contiguous), topk_weights [T, k] float32,
    topk_ids [T, k] int32 (values in [0, E): not checked, that would sync). Returns [T, H] in x's dtype.
    FP8 experts (vLLM's argument names: w1 is the stacked gate/up w13): w13 / w2 float8_e4m3fn with w1_scale /
    w2_scale (and optional static a1_scale / a2_scale, or block_size): see Fp8Experts. Both GEMMs then run W8A8
    on tensor cores, except the few-token down_sum, which dequantizes the weights in registers (W8A16)."""
    _require_triton()
    fp8 = None
    if w1_scale is not None or w2_scale is not None:
        if w1_scale is None or w2_scale is None:
            raise ValueError("fused_experts: FP8 experts need both w1_scale and w2_scale")
        fp8 = Fp8Experts(w1_scale.float(), w2_scale.float(), block_size, a1_scale, a2_scale)
    _check_experts_args(x, w13, w2, topk_weights, topk_ids, fp8)
    t, h = x.shape
    e, two_i, _ = w13.shape
    inter = two_i // 2
    k = topk_ids.shape[1]
    out = torch.empty_like(x)
    if t == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = config or get_config(e, inter, h, w13.dtype, t, k)
    al = align_pairs(topk_ids, e, cfg.block_m, cfg.direct)
    down_sum_path = al.direct and cfg.fuse_sum
    down_fp8 = None  # the down GEMM's FP8 input scales, when its input is quantized
    if fp8 is None:
        down_in = gate_up(x, w13, al, k, cfg.up)
    else:
        xq, xs = fp8_quant.quantize(x, fp8.act_quant(fp8.a13_scale))
        up_scales = Fp8Gemm(xs, fp8.w13_scale, fp8.block_size)
        if fp8.block_size is not None and fp8.block_size[1] == cfg.up.BLOCK_N and not down_sum_path:
            # the gate_up tile is one quantization group of the down GEMM's input: it writes FP8 itself
            down_in, a_s = gate_up_quantized(xq, w13, al, k, cfg.up, up_scales, x.dtype)
            down_fp8 = Fp8Gemm(a_s, fp8.w2_scale, fp8.block_size)
        else:
            down_in = gate_up(xq, w13, al, k, cfg.up, up_scales, out_dtype=x.dtype)
            if not down_sum_path:  # down_sum reads the bf16 activation (W8A16)
                down_in, a_s = fp8_quant.quantize(down_in, fp8.act_quant(fp8.a2_scale))
                down_fp8 = Fp8Gemm(a_s, fp8.w2_scale, fp8.block_size)
    if down_sum_path:
        down_sum(down_in, w2, al, k, topk_weights, cfg.down, out, fp8.w2_scale if fp8 else None,
                 fp8.block_size if fp8 else None)  # fmt: skip
        return out
    per_pair = out if k == 1 else torch.empty((al.num_pairs, h), dtype=x.dtype, device=x.device)
    down(down_in, w2, al, topk_weights, cfg.down, per_pair, down_fp8)
    if k > 1:
        if not reduce:
            return per_pair.view(t, k, h)
        torch.sum(per_pair.view(t, k, h), dim=1, out=out)
    return out


@dataclass(frozen=True)
class Fp8Gemm:
    """The scales of one FP8 grouped GEMM's operands: the input rows' (a_scale [1] per tensor, [rows, 1] per row,
    or [rows, K/bk] per row and group) and the experts' weights' ([E], [E, N] per output row, or [E, N/bn, K/bk]
    blocks)."""

    a_scale: torch.Tensor
    w_scale: torch.Tensor
    block_size: tuple[int, int] | None

    def kernel_args(self) -> tuple[list, dict]:
        """(the kernels' scale pointer and stride arguments, their QUANT/BN/BK constants)."""
        a, w = self.a_scale, self.w_scale
        block = self.block_size is not None
        a_row = a.stride(0) if a.numel() > 1 else 0  # per row (or row and group), or one for the tensor
        if block:
            args = [a, w, a_row, w.stride(0), w.stride(1), w.stride(2)]
        else:
            e = w.shape[0]
            w = w.reshape(e, -1)  # [E, 1] (one per expert) or [E, N]
            args = [a, w, a_row, w.stride(0), 0 if w.shape[1] == 1 else w.stride(1), 0]
        bn, bk = self.block_size or (128, 128)
        return args, {"QUANT": 2 if block else 1, "BN": bn, "BK": bk}

    def fit(self, cfg: GemmConfig) -> GemmConfig:
        """Block scales change every BK columns: a K step may not straddle two (BLOCK_K divides BK)."""
        if self.block_size is None or self.block_size[1] % cfg.BLOCK_K == 0:
            return cfg
        return GemmConfig(cfg.BLOCK_N, min(cfg.BLOCK_K, self.block_size[1]), cfg.GROUP_M, cfg.num_warps,
                          cfg.num_stages)  # fmt: skip


def _no_scales(x: torch.Tensor, w: torch.Tensor) -> tuple[list, dict]:
    return [x, w, 0, 0, 0, 0], {}


def gate_up(
    x: torch.Tensor, w13: torch.Tensor, al: Alignment, top_k: int, cfg: GemmConfig, fp8: Fp8Gemm | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:  # fmt: skip
    """silu(x @ gate_e^T) * (x @ up_e^T) for every pair, as [T*k, I] rows in pair order (one launch). FP8: x is
    the quantized input and `fp8` holds the scales; out_dtype (default x's dtype) is then the model's."""
    activated = torch.empty((al.num_pairs, w13.shape[1] // 2), dtype=out_dtype or x.dtype, device=x.device)
    _launch_gate_up(x, w13, al, top_k, cfg, fp8, activated, None)
    return activated


def gate_up_quantized(
    xq: torch.Tensor, w13: torch.Tensor, al: Alignment, top_k: int, cfg: GemmConfig, fp8: Fp8Gemm,
    model_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """gate_up for block-scaled FP8 experts whose tile is one group of the down GEMM's input (cfg.BLOCK_N == bk):
    the activation leaves as FP8 [T*k, I] with per-row-and-group scales [T*k, I/bk], the same values and scales as
    gate_up then fp8_quant.quantize(group bk); one pass over the activation and one launch fewer."""
    inter = w13.shape[1] // 2
    q = torch.empty((al.num_pairs, inter), dtype=fp8_quant.FP8_DTYPE, device=xq.device)
    scales = torch.empty((al.num_pairs, triton.cdiv(inter, cfg.BLOCK_N)), dtype=torch.float32, device=xq.device)
    _launch_gate_up(xq, w13, al, top_k, cfg, fp8, q, (scales, model_dtype))
    return q, scales


def _launch_gate_up(x, w13, al: Alignment, top_k: int, cfg: GemmConfig, fp8: Fp8Gemm | None, out, quant_out) -> None:
    h = x.shape[1]
    inter = w13.shape[1] // 2
    max_tiles = al.tile_expert.numel()
    scale_args, consts = fp8.kernel_args() if fp8 is not None else _no_scales(x, w13)
    cfg = fp8.fit(cfg) if fp8 is not None else cfg
    if quant_out is not None:
        scales, model_dtype = quant_out
        round_to = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[model_dtype]
        out_args = [scales, scales.stride(0), fp8_quant.MIN_SCALE]
        consts = consts | {"QUANT_OUT": True, "ROUND_TO": round_to, "QMAX": fp8_quant.FP8_MAX}
    else:
        out_args = [out, 0, 0.0]
    _gate_up_kernel[(max_tiles * triton.cdiv(inter, cfg.BLOCK_N),)](
        x, w13, out, al.sorted_pairs, al.tile_expert, al.num_pairs, inter, h, max_tiles,
        x.stride(0), w13.stride(0), w13.stride(1), out.stride(0), top_k, *scale_args, *out_args,
        BLOCK_M=al.block_m, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        EVEN_K=h % cfg.BLOCK_K == 0, DIRECT=al.direct, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **consts,
    )  # fmt: skip


def down(
    activated: torch.Tensor, w2: torch.Tensor, al: Alignment, topk_weights: torch.Tensor, cfg: GemmConfig,
    out: torch.Tensor, fp8: Fp8Gemm | None = None,
) -> None:  # fmt: skip
    """out[pair] = w_pair * activated[pair] @ w2_e^T for every pair (one launch); out is [T*k, H]. FP8: activated
    is the quantized intermediate and `fp8` holds the scales."""
    inter = activated.shape[1]
    h = w2.shape[1]
    max_tiles = al.tile_expert.numel()
    weights = topk_weights.reshape(-1)
    if weights.dtype != torch.float32:
        weights = weights.float()
    scale_args, consts = fp8.kernel_args() if fp8 is not None else _no_scales(activated, w2)
    cfg = fp8.fit(cfg) if fp8 is not None else cfg
    _down_kernel[(max_tiles * triton.cdiv(h, cfg.BLOCK_N),)](
        activated, w2, out, al.sorted_pairs, al.tile_expert, weights, al.num_pairs, h, inter, max_tiles,
        activated.stride(0), w2.stride(0), w2.stride(1), out.stride(0), *scale_args,
        BLOCK_M=al.block_m, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        EVEN_K=inter % cfg.BLOCK_K == 0, DIRECT=al.direct, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **consts,
    )  # fmt: skip


def down_sum(
    activated: torch.Tensor, w2: torch.Tensor, al: Alignment, top_k: int, topk_weights: torch.Tensor,
    cfg: GemmConfig, out: torch.Tensor, w2_scale: torch.Tensor | None = None,
    block_size: tuple[int, int] | None = None,
) -> None:  # fmt: skip
    """out[t] = sum_k w_k * activated[t*k + j] @ w2_e^T, one launch, for a direct alignment (few tokens).
    FP8 w2 (w2_scale given): dequantized in registers; activated stays in the model dtype."""
    if not al.direct:
        raise ValueError("down_sum needs a direct alignment (one pair per tile, ids in pair order)")
    h = w2.shape[1]
    weights = topk_weights.reshape(-1)
    if weights.dtype != torch.float32:
        weights = weights.float()
    consts: dict = {}
    scale_args = [w2, 0, 0, 0]
    block_k = cfg.BLOCK_K
    if w2_scale is not None:
        ws = w2_scale.float()
        if block_size is not None:
            scale_args = [ws, ws.stride(0), ws.stride(1), ws.stride(2)]
            block_k = min(block_k, block_size[1])
            consts = {"QUANT": 2, "BN": block_size[0], "BK": block_size[1]}
        else:
            ws = ws.reshape(ws.shape[0], -1)  # [E, 1] (one per expert) or [E, H]
            scale_args = [ws, ws.stride(0), 0 if ws.shape[1] == 1 else ws.stride(1), 0]
            consts = {"QUANT": 1}
    _down_sum_kernel[(out.shape[0], triton.cdiv(h, cfg.BLOCK_N))](
        activated, w2, out, al.tile_expert, weights, h, activated.stride(0), w2.stride(0), w2.stride(1),
        out.stride(0), *scale_args, K=activated.shape[1], TOP_K=top_k, BLOCK_N=cfg.BLOCK_N, BLOCK_K=block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **consts,
    )  # fmt: skip


# ---- tile configs ----


def default_config(num_tokens: int, num_experts: int, top_k: int) -> MoeConfig:
    """For shapes no autotune run has seen: small tiles while experts get a few rows each (weight-bound),
    larger ones as rows per expert grow (compute-bound)."""
    rows_per_expert = num_tokens * top_k / num_experts
    if num_tokens <= DIRECT_MAX_TOKENS:
        return MoeConfig(16, GemmConfig(32, 128, 1, 4, 4), GemmConfig(64, 128, 1, 4, 4), direct=True)
    if rows_per_expert <= 16:
        return MoeConfig(16, GemmConfig(32, 128, 1, 4, 4), GemmConfig(64, 128, 1, 4, 4))
    if rows_per_expert <= 64:
        return MoeConfig(32, GemmConfig(64, 64, 8, 4, 4), GemmConfig(64, 64, 8, 4, 4))
    return MoeConfig(64, GemmConfig(128, 64, 8, 8, 3), GemmConfig(128, 64, 8, 8, 3))


def device_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def config_file_name(num_experts: int, inter: int, hidden: int, dtype: torch.dtype, device_name: str) -> str:
    return (
        f"E={num_experts},N={inter},H={hidden},device={device_key(device_name)},dtype={str(dtype).split('.')[-1]}.json"
    )


@functools.cache
def load_configs(file_name: str) -> dict[int, MoeConfig] | None:
    """Batch-size bucket -> config from one autotune file, or None when there is none for this shape and GPU."""
    path = CONFIG_DIR / file_name
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return {int(b): MoeConfig.from_json(c) for b, c in data["configs"].items()}


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def current_device_name() -> str:
    return _device_name(torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"


def get_config(num_experts: int, inter: int, hidden: int, dtype: torch.dtype, num_tokens: int, top_k: int) -> MoeConfig:
    """The tuned config of the nearest batch bucket for this GPU and shape, else `default_config`."""
    table = load_configs(config_file_name(num_experts, inter, hidden, dtype, current_device_name()))
    if not table:
        return default_config(num_tokens, num_experts, top_k)
    return table[min(table, key=lambda b: (abs(b - num_tokens), b))]


def config_source(num_experts: int, inter: int, hidden: int, dtype: torch.dtype) -> str:
    """For the start-up log: which tile configs this shape will use on this GPU."""
    file_name = config_file_name(num_experts, inter, hidden, dtype, current_device_name())
    return f"tuned ({file_name})" if load_configs(file_name) else f"default tiles (no {file_name})"
