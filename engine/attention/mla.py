"""Multi-head latent attention (MLA, DeepSeek-V2/V3) over a latent-only paged cache: what its backends share.

MLA caches one row per token per layer: the normed compressed KV (`kv_lora_rank` wide) followed by the shared
rotary key (`qk_rope_head_dim`), e.g. 512 + 64 = 576 values, in a pool of shape [num_blocks, block_size, 576].
There is no separate V: attention runs absorbed (W_UK folded into the query by the model), so the keys are the
whole rows and the values are their first `kv_lora_rank` columns. That halves the pool of a K-and-V layout.

The model calls `forward_mla(layer, q_latent, q_rope, latent, k_rope, cache)`; a backend stores the new rows at
the step's slots and returns the attended latent [T, H, kv_lora_rank]. The page-table arrays below are pure
numpy, so their construction is tested on CPU; flashinfer's MLA wrapper (engine/attention/flashinfer_mla.py)
plans from them on CUDA, the torch reference (engine/attention/torch_mla.py) attends over the same pool anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .base import AttentionMetadata, paged_kv_layout


def latent_cache_shape(num_blocks: int, block_size: int, latent_width: int) -> tuple[int, int, int]:
    """One layer's latent pool: [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]."""
    return (num_blocks, block_size, latent_width)


@dataclass(frozen=True)
class MLAPageTable:
    """flashinfer's MLA plan inputs (int32 numpy): per sequence its query rows, its pages and its context length."""

    qo_indptr: np.ndarray  # [B+1]: sequence b's new tokens are query rows [qo_indptr[b], qo_indptr[b+1])
    kv_indptr: np.ndarray  # [B+1]: sequence b's pages are kv_indices[kv_indptr[b]:kv_indptr[b+1]]
    kv_indices: np.ndarray  # [sum of pages]: block ids, in each sequence's order
    kv_lens: np.ndarray  # [B]: tokens in the cache after this step (the new ones included)


def mla_page_table(
    query_lens: Sequence[int], seq_lens: Sequence[int], block_tables: Sequence[Sequence[int]], block_size: int
) -> MLAPageTable:
    """The page table of one step: each sequence's first ceil(seq_len / block_size) blocks, and its query rows
    (a prefill chunk's new tokens, or one decode token) packed in batch order."""
    qo = np.zeros(len(query_lens) + 1, dtype=np.int32)
    np.cumsum(np.asarray(query_lens, dtype=np.int64), out=qo[1:])
    indptr, indices, _ = paged_kv_layout(seq_lens, block_tables, block_size)
    return MLAPageTable(qo, indptr, indices.astype(np.int32, copy=False), np.asarray(seq_lens, dtype=np.int32))


def mla_page_table_from_meta(meta: AttentionMetadata) -> MLAPageTable:
    return mla_page_table(meta.query_lens_list, meta.seq_lens_list, meta.block_tables_list, meta.block_size)


def decode_page_table(
    indptr: np.ndarray, indices: np.ndarray, last_page_len: np.ndarray, block_size: int
) -> MLAPageTable:
    """A decode batch's MLA page table from the dense path's triple (`paged_kv_layout_flat`, what the model runner
    builds for CUDA-graph replays): one query row per sequence, and context lengths recovered from the page counts
    and the last page's fill."""
    b = len(last_page_len)
    pages = np.diff(np.asarray(indptr, dtype=np.int64))
    kv_lens = ((pages - 1) * block_size + np.asarray(last_page_len, dtype=np.int64)).astype(np.int32)
    return MLAPageTable(
        np.arange(b + 1, dtype=np.int32),
        np.asarray(indptr, dtype=np.int32),
        np.asarray(indices, dtype=np.int32),
        kv_lens,
    )


# flashinfer's MLA planner splits a step into at most this many work items (tiles of 64 packed query rows x kv
# chunks) and writes past its buffers, silently, beyond it: a step that could exceed it is refused instead.
MLA_MAX_WORK_ITEMS = 16384
_MAX_SMS = 256  # the planner adds at most one kv split per cluster, and there are at most as many clusters as SMs


def mla_work_bound(query_lens: Sequence[int] | np.ndarray, num_heads: int) -> int:
    """An upper bound on the work items flashinfer's MLA plan makes of a step: each sequence's packed query rows
    (tokens x heads) in tiles of 64 rows, or of 128 when the mean sequence packs more than 64 (the planner then pairs
    its blocks in clusters of two), plus at most one extra kv split per cluster."""
    rows = np.asarray(query_lens, dtype=np.int64) * num_heads
    if rows.size == 0:
        return 0
    tile = 128 if int(rows.sum()) // rows.size > 64 else 64
    return int((-(-rows // tile)).sum()) + _MAX_SMS


def check_mla_budget(max_num_batched_tokens: int, max_num_seqs: int, num_heads: int) -> None:
    """At start-up: no step the engine may schedule can exceed the planner's work items (else a step would fail
    mid-run). The worst step bounded loosely: every token's rows in 64-row tiles, a part tile per sequence."""
    seqs = min(max_num_seqs, max_num_batched_tokens)
    bound = -(-max_num_batched_tokens * num_heads // 64) + seqs + _MAX_SMS
    if bound > MLA_MAX_WORK_ITEMS:
        most = (MLA_MAX_WORK_ITEMS - seqs - _MAX_SMS) * 64 // num_heads
        raise ValueError(
            f"max_num_batched_tokens {max_num_batched_tokens} x {num_heads} attention heads may exceed the "
            f"{MLA_MAX_WORK_ITEMS} work items flashinfer's MLA kernel plans per step: lower --max-num-batched-tokens "
            f"(at most {most} with max_num_seqs {max_num_seqs})"
        )


def check_mla_work(query_lens: Sequence[int] | np.ndarray, num_heads: int) -> None:
    bound = mla_work_bound(query_lens, num_heads)
    if bound > MLA_MAX_WORK_ITEMS:
        raise ValueError(
            f"a step of {int(np.sum(query_lens))} tokens x {num_heads} heads may exceed the {MLA_MAX_WORK_ITEMS} work "
            f"items flashinfer's MLA kernel plans (bound {bound}): lower --max-num-batched-tokens"
        )


@runtime_checkable
class LatentAttention(Protocol):
    """What DeepSeek's attention layer calls on its backend (the torch reference and flashinfer's MLA both are)."""

    kv_lora_rank: int

    def forward_mla(
        self,
        layer_idx: int,
        q_latent: torch.Tensor,
        q_rope: torch.Tensor,
        latent: torch.Tensor,
        k_rope: torch.Tensor,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        """q_latent [T, H, kv_lora_rank] (the nope query through W_UK), q_rope [T, H, rope]; latent [T, kv_lora_rank]
        and k_rope [T, rope] of the new tokens, stored at the step's slots first. Returns the softmax-weighted
        latents [T, H, kv_lora_rank] (W_UV is the model's to apply)."""
        ...
