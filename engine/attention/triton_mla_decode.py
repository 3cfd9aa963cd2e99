"""Absorbed MLA decode attention as a split-KV Triton kernel of our own (KUBELLM_MLA_DECODE_BACKEND=triton).

Why: flashinfer's sm90 MLA planner tiles query rows by 64, and a decode row of DeepSeek-V2-Lite has 16 heads, so a
tile is a quarter full and its decode attention reached ~64% of the bandwidth roofline (issue 22). A decode step is
bound by reading each row's context latents once (576 values a token), so here one program holds every head of a
row (up to BLOCK_H of them), reads a tile of BLOCK_N latents once, and multiplies on tensor cores:
[heads x 576] . [576 x BLOCK_N] for the scores, [heads x BLOCK_N] . [BLOCK_N x 512] for the output.

What it computes, exactly as the flashinfer path does (engine/attention/flashinfer_mla.py): per row and head,
scores = (q_latent . c + q_rope . k_rope) x scale over the row's whole context (a decode row sees every cached token,
its own new one included), softmax in float32, output = softmax . c (kv_lora_rank wide), in the query's dtype.
The pool is the latent-only paged pool of engine/attention/mla.py, read through the same page table (kv_indptr /
kv_indices / kv_lens) and passed as its two column views (latent, rope), as flashinfer takes it.

Work split: a grid of (row, head group, KV split). Each split takes a contiguous run of the row's context (the
context divided by the split count, at least min_split_tokens, rounded up to BLOCK_N), keeps an online softmax
(base 2) and writes its partial output and log-sum-exp; a second kernel merges a row's splits. The split count is a
function of the batch size and the SM count only (`decode_splits`), never of the contexts, so a CUDA graph captured
for a batch size replays one fixed grid for any page table: splits past a short context find nothing to read and
write only their -inf log-sum-exp, which the merge weighs 0 without reading their output.
With one split the first kernel writes the normalized output itself and no merge runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kubellm.engine.transfer import to_device_async

from .mla import MLAPageTable

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the flashinfer MLA backend (which uses this) is CUDA-only anyway
    triton = None
    tl = None

LOG2E = 1.4426950408889634
MAX_SPLITS = 64  # long contexts at small batches; short ones use fewer (min_split_tokens), the rest exit at once


@dataclass(frozen=True)
class DecodeConfig:
    """Launch shape: BLOCK_H heads share one read of each latent tile of BLOCK_N tokens. The default's sm90 build
    (Triton 3.6, ptxas -v and the ttgir, 2026-12-08): 202 registers a thread, no spills, 91 KiB of shared memory (two
    tile buffers), so two programs fit an SM (registers bound it), each with up to two 36 KiB tiles in flight: hence
    two programs per SM as the split target. Reading each tile's page ids one iteration ahead is what lets Triton's
    pipeliner double-buffer the tile (read in the same iteration, it kept one buffer at any num_stages). Other
    shapes seen: BLOCK_N 32 / 8 warps / 3 stages 112 registers; 16 / 4 / 3 142 registers and 55 KiB (three a SM).
    Unmeasured on a GPU so far: bench/mla_micro.py sweeps shapes (triton-N-W-S-P[-M])."""

    block_h: int = 16
    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 3  # two shared buffers: the next tile's copy in flight during this one's dots
    programs_per_sm: int = 2  # the split count aims at this many programs per SM
    # a split reads at least this many tokens: its partial output (heads x 512 floats, written then merged) would
    # otherwise cost about as much traffic as the latents it read
    min_split_tokens: int = 64


DEFAULT = DecodeConfig()


def decode_splits(batch: int, num_heads: int, num_sms: int, config: DecodeConfig = DEFAULT) -> int:
    """KV splits per row for a batch of `batch` decode rows: enough programs to fill `programs_per_sm` x the SMs,
    at most MAX_SPLITS. A function of the batch size alone (a captured graph's grid is fixed)."""
    groups = -(-num_heads // config.block_h)
    return max(1, min(MAX_SPLITS, -(-config.programs_per_sm * num_sms // max(1, batch * groups))))


if triton is not None:

    @triton.jit
    def _mla_decode_split_kernel(
        q_lat_ptr, q_pe_ptr, ckv_ptr, kpe_ptr, kv_indptr_ptr, kv_indices_ptr, kv_lens_ptr,
        part_acc_ptr, part_lse_ptr, out_ptr,
        scale_log2, num_heads, num_splits, min_run,
        stride_ql_t, stride_ql_h, stride_qp_t, stride_qp_h,
        stride_c_page, stride_c_tok, stride_p_page, stride_p_tok,
        stride_o_t, stride_o_h,
        RANK: tl.constexpr, ROPE: tl.constexpr, PAGE: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        group = tl.program_id(1)
        split = tl.program_id(2)
        heads = group * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = heads < num_heads
        offs_r = tl.arange(0, RANK)
        offs_p = tl.arange(0, ROPE)

        kv_len = tl.load(kv_lens_ptr + row)
        run = tl.cdiv(tl.maximum(tl.cdiv(kv_len, num_splits), min_run), BLOCK_N) * BLOCK_N
        lo = split * run
        hi = tl.minimum(lo + run, kv_len)
        first_page = tl.load(kv_indptr_ptr + row)

        q_lat = tl.load(
            q_lat_ptr + row * stride_ql_t + heads[:, None] * stride_ql_h + offs_r[None, :],
            mask=h_ok[:, None],
            other=0.0,
        )
        q_pe = tl.load(
            q_pe_ptr + row * stride_qp_t + heads[:, None] * stride_qp_h + offs_p[None, :], mask=h_ok[:, None], other=0.0
        )
        m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
        denom = tl.zeros((BLOCK_H,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_H, RANK), dtype=tl.float32)
        # each tile's page ids are read one iteration ahead: the latent loads then depend on a loop-carried value
        # only, not on a load of their own iteration
        offs_n = lo + tl.arange(0, BLOCK_N)
        page = tl.load(kv_indices_ptr + first_page + offs_n // PAGE, mask=offs_n < hi, other=0).to(tl.int64)
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < hi
            tok = offs_n % PAGE
            c = tl.load(
                ckv_ptr + page[:, None] * stride_c_page + tok[:, None] * stride_c_tok + offs_r[None, :],
                mask=n_ok[:, None],
                other=0.0,
            )  # [BLOCK_N, RANK]: read once, used as keys and as values
            pe = tl.load(
                kpe_ptr + page[:, None] * stride_p_page + tok[:, None] * stride_p_tok + offs_p[None, :],
                mask=n_ok[:, None],
                other=0.0,
            )
            s = tl.dot(q_lat, tl.trans(c)) + tl.dot(q_pe, tl.trans(pe))  # [BLOCK_H, BLOCK_N], float32
            s = tl.where(n_ok[None, :], s * scale_log2, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: a tile holds at least one token
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            denom = denom * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c)
            m = m_new
            ahead = offs_n + BLOCK_N
            page = tl.load(kv_indices_ptr + first_page + ahead // PAGE, mask=ahead < hi, other=0).to(tl.int64)

        safe = tl.where(denom > 0.0, denom, 1.0)  # an empty split: output 0, log-sum-exp -inf
        acc = acc / safe[:, None]
        if DIRECT:
            o = out_ptr + row * stride_o_t + heads[:, None] * stride_o_h + offs_r[None, :]
            tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=h_ok[:, None])
        else:
            lse = tl.where(denom > 0.0, m + tl.log2(safe), float("-inf"))
            part = (row * num_heads + heads) * num_splits + split  # [BLOCK_H]
            # an empty split writes its -inf only: the merge never reads its output
            keep = heads[:, None] < tl.where(hi > lo, num_heads, 0)
            tl.store(part_acc_ptr + part[:, None].to(tl.int64) * RANK + offs_r[None, :], acc, mask=keep)
            tl.store(part_lse_ptr + part, lse, mask=h_ok)

    @triton.jit
    def _mla_decode_merge_kernel(
        part_acc_ptr, part_lse_ptr, out_ptr, num_heads, num_splits, stride_o_t, stride_o_h, RANK: tl.constexpr
    ):  # fmt: skip
        row = tl.program_id(0)
        head = tl.program_id(1)
        base = (row * num_heads + head) * num_splits
        m = tl.load(part_lse_ptr + base)
        for s in range(1, num_splits):
            m = tl.maximum(m, tl.load(part_lse_ptr + base + s))
        m = tl.where(m == float("-inf"), 0.0, m)  # every split empty (no context): output 0
        offs_r = tl.arange(0, RANK)
        total = tl.exp2(tl.load(part_lse_ptr + base) - m)
        # (masks as comparisons with a bound: all lanes or none, as the weight is 0 or not)
        read = offs_r < tl.where(total > 0.0, RANK, 0)
        acc = total * tl.load(part_acc_ptr + base.to(tl.int64) * RANK + offs_r, mask=read, other=0.0)
        for s in range(1, num_splits):
            w = tl.exp2(tl.load(part_lse_ptr + base + s) - m)  # 0 for an empty split, whose output is not read
            read = offs_r < tl.where(w > 0.0, RANK, 0)
            acc += w * tl.load(part_acc_ptr + (base + s).to(tl.int64) * RANK + offs_r, mask=read, other=0.0)
            total += w
        acc = acc / tl.where(total > 0.0, total, 1.0)
        tl.store(out_ptr + row * stride_o_t + head * stride_o_h + offs_r, acc.to(out_ptr.dtype.element_ty))


def mla_decode(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    ckv: torch.Tensor,
    kpe: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float,
    num_splits: int,
    config: DecodeConfig = DEFAULT,
) -> torch.Tensor:
    """Decode attention of B rows (one query token each): q_latent [B, H, R], q_rope [B, H, P]; ckv [pages, page, R]
    and kpe [pages, page, P] (column views of the pool); kv_indptr [B+1], kv_indices, kv_lens [B] int32 on the
    device. Returns [B, H, R] in q_latent's dtype."""
    if triton is None:
        raise RuntimeError("the triton MLA decode kernel needs Triton")
    b, h, r = q_latent.shape
    p = q_rope.shape[-1]
    page = ckv.shape[1]
    for name, n in (("kv_lora_rank", r), ("rope dim", p), ("page size", page)):
        if n & (n - 1) or n < 16:
            raise ValueError(f"the triton MLA decode kernel needs a power-of-two {name} of at least 16, got {n}")
    if ckv.stride(-1) != 1 or kpe.stride(-1) != 1 or q_latent.stride(-1) != 1 or q_rope.stride(-1) != 1:
        raise ValueError("the triton MLA decode kernel reads rows with unit stride")
    if num_splits < 1:
        raise ValueError(f"num_splits must be at least 1, got {num_splits}")
    out = q_latent.new_empty((b, h, r))
    if b == 0:
        return out
    direct = num_splits == 1
    if direct:  # the kernel writes the output itself; the partial pointers are never read
        part_acc = part_lse = out
    else:
        part_acc = torch.empty((b, h, num_splits, r), dtype=torch.float32, device=q_latent.device)
        part_lse = torch.empty((b, h, num_splits), dtype=torch.float32, device=q_latent.device)
    grid = (b, triton.cdiv(h, config.block_h), num_splits)
    _mla_decode_split_kernel[grid](
        q_latent, q_rope, ckv, kpe, kv_indptr, kv_indices, kv_lens, part_acc, part_lse, out,
        scale * LOG2E, h, num_splits, config.min_split_tokens,
        q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1),
        ckv.stride(0), ckv.stride(1), kpe.stride(0), kpe.stride(1), out.stride(0), out.stride(1),
        RANK=r, ROPE=p, PAGE=page, BLOCK_H=config.block_h, BLOCK_N=config.block_n, DIRECT=direct,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if not direct:
        _mla_decode_merge_kernel[(b, h)](
            part_acc, part_lse, out, h, num_splits, out.stride(0), out.stride(1), RANK=r, num_warps=4
        )
    return out


@dataclass
class PageTableBuffers:
    """Device page-table buffers a CUDA graph's launches read; each step's table is copied into them."""

    kv_indptr: torch.Tensor  # int32 [max_bs + 1]
    kv_indices: torch.Tensor  # int32 [max pages]
    kv_lens: torch.Tensor  # int32 [max_bs]

    @classmethod
    def allocate(cls, max_batch: int, max_pages: int, device: torch.device) -> PageTableBuffers:
        z = torch.zeros
        return cls(
            z(max_batch + 1, dtype=torch.int32, device=device),
            z(max_pages, dtype=torch.int32, device=device),
            z(max_batch, dtype=torch.int32, device=device),
        )


class TritonMLADecode:
    """A decode-only "wrapper" with the calls FlashInferMLAAttention makes of flashinfer's (plan a step's page
    table, then run each layer). Eager: each plan sends the table over in one copy. Graph (`buffers` given, one
    instance per captured batch size): the plan copies the table into the shared fixed buffers the captured
    launches read."""

    _backend = "triton"  # the family name, where flashinfer's wrappers keep theirs

    def __init__(
        self,
        num_heads: int,
        scale: float,
        device: torch.device,
        *,
        num_sms: int,
        buffers: PageTableBuffers | None = None,
        config: DecodeConfig = DEFAULT,
    ):
        self.num_heads, self.scale, self.device = num_heads, scale, device
        self.num_sms, self.buffers, self.config = num_sms, buffers, config
        self._table: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def splits(self, batch: int) -> int:
        return decode_splits(batch, self.num_heads, self.num_sms, self.config)

    def plan(self, table: MLAPageTable) -> None:
        if not np.array_equal(table.qo_indptr, np.arange(len(table.kv_lens) + 1)):
            raise ValueError("the triton MLA decode kernel takes decode-only steps (one query token per row)")
        b, n = len(table.kv_lens), len(table.kv_indices)
        host = np.concatenate([table.kv_indptr, table.kv_lens, table.kv_indices]).astype(np.int32, copy=False)
        dev = to_device_async(host, torch.int32, self.device)
        indptr, lens, indices = dev[: b + 1], dev[b + 1 : 2 * b + 1], dev[2 * b + 1 :]
        if self.buffers is not None:
            if n > self.buffers.kv_indices.numel() or b > self.buffers.kv_lens.numel():
                raise ValueError(f"{b} rows of {n} pages exceed the CUDA-graph page-table buffers")
            self.buffers.kv_indptr[: b + 1].copy_(indptr)
            self.buffers.kv_lens[:b].copy_(lens)
            self.buffers.kv_indices[:n].copy_(indices)
            indptr, lens, indices = self.buffers.kv_indptr[: b + 1], self.buffers.kv_lens[:b], self.buffers.kv_indices
        self._table = (indptr, indices, lens)

    def run(self, q_latent: torch.Tensor, q_rope: torch.Tensor, ckv: torch.Tensor, kpe: torch.Tensor) -> torch.Tensor:
        assert self._table is not None, "plan before run"
        indptr, indices, lens = self._table
        if q_latent.shape[0] != lens.numel():
            raise ValueError(f"{q_latent.shape[0]} query rows for a plan of {lens.numel()} decode rows")
        b = q_latent.shape[0]
        return mla_decode(q_latent, q_rope, ckv, kpe, indptr, indices, lens, self.scale, self.splits(b), self.config)


__all__ = ["DEFAULT", "DecodeConfig", "PageTableBuffers", "TritonMLADecode", "decode_splits", "mla_decode"]
