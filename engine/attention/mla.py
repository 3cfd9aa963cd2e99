"""Multi-head latent attention (MLA, DeepSeek-V2/V3) over a latent-only paged cache: what its backends share.

MLA caches one row per token per layer: the normed compressed KV (`kv_lora_rank` wide) followed by the shared
rotary key (`qk_rope_head_dim`), e.g. 512 + 64 = 576 values, in a pool of shape [num_blocks, block_size, 576].
There is no separate V: attention runs absorbed (W_UK folded into the query by the model), so the keys are the
whole rows and the values are their first `kv_lora_rank` columns. That halves the pool of a K-and-V layout.

The model calls `forward_mla(layer, q_latent, q_rope, latent, k_rope, cache)`; a backend stores the new rows at
the step's slots and returns the attended latent [T, H, kv_lora_rank].

Up-projected prefill (engine setting `mla_upproject_min_tokens`, 0 = never): a prefill chunk of at least that many
new tokens may instead attend like ordinary multi-head attention. Its context's cached latents (the new tokens'
included, written first as always) are gathered from the pool and up-projected through kv_b_proj to per-head K_nope
and V; with the shared rope key appended, the chunk's queries (nope + rope, e.g. 128 + 64) attend causally over the
whole context with head dims 192 / 128 instead of 576 / 512. That trades the up-projection of the context
(context x heads x (nope + v) x kv_lora_rank) for about a third of the attention work per query-key pair, so it
pays for long chunks; decode rows and short chunks stay absorbed. `upproject_split` plans which rows go which way
(pure numpy); the backend exposes the step's split as `mla_split` (None: every row absorbed, the path above).
The up-projected K/V are temporaries of context tokens x heads x (2 nope + rope + 2 v) values per layer, so a step's
up-projected chunks hold at most `mla_upproject_max_context_tokens` context tokens in total (the rest of its chunks
attend absorbed) and the start-up memory profile reserves `upproject_temp_bytes` of that bound.

The page-table arrays below are pure numpy, so their construction is tested on CPU; flashinfer's MLA wrapper
(engine/attention/flashinfer_mla.py) plans from them on CUDA, the torch reference (engine/attention/torch_mla.py)
attends over the same pool anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .base import AttentionMetadata, _to_device, paged_kv_layout


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


@dataclass(frozen=True)
class UpProjectSplit:
    """One step's rows split between the absorbed and the up-projected path (int numpy arrays)."""

    up_seqs: np.ndarray  # int64 [U]: the up-projected sequences (prefill chunks of >= min tokens), in batch order
    absorbed_seqs: np.ndarray  # int64 [A]: the rest (decodes, short chunks), in batch order
    up_rows: np.ndarray  # int64 [Tu]: the step's token rows of the up-projected chunks, packed in order
    absorbed_rows: np.ndarray  # int64 [Ta]
    qo_indptr: np.ndarray  # int32 [U+1]: up sequence u's queries are rows [qo_indptr[u], qo_indptr[u+1]) of up_rows
    kv_indptr: np.ndarray  # int32 [U+1]: its whole context (cached + new) is rows [kv_indptr[u], kv_indptr[u+1])
    context_slots: np.ndarray  # int64 [S]: the pool slot (block * block_size + offset) of each such context row
    cached_lens: np.ndarray  # int64 [U]: tokens cached before this chunk (queries are bottom-right aligned)


def upproject_candidates(query_lens: Sequence[int] | np.ndarray, min_tokens: int) -> np.ndarray:
    """bool [B]: the prefill chunks long enough to attend up-projected (at least `min_tokens` new tokens, and at
    least 2: a single new token is a decode row); none when `min_tokens` is 0."""
    qlens = np.asarray(query_lens, dtype=np.int64)
    if min_tokens <= 0:
        return np.zeros(len(qlens), dtype=bool)
    return qlens >= max(min_tokens, 2)


def upproject_split(
    query_lens: Sequence[int],
    seq_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    min_tokens: int,
    max_context_tokens: int,
) -> UpProjectSplit | None:
    """Which sequences of a step attend up-projected: the prefill chunks of at least `min_tokens` new tokens (and
    at least 2: a single new token is a decode row), as long as their contexts (cached + new tokens) hold at most
    `max_context_tokens` in total. The up-projected K/V are temporaries of context x heads wide, so this bound is
    what the memory profile reserves for: candidates are taken in batch order, and one whose context would pass
    the bound attends absorbed instead (the same result, by the other path); a later, shorter one may still fit.
    None when none is taken (or `min_tokens` is 0): the whole step runs absorbed, as without the setting."""
    if min_tokens < 0:
        raise ValueError(f"mla_upproject_min_tokens must be >= 0, got {min_tokens}")
    if max_context_tokens < 0:
        raise ValueError(f"the up-projected context bound must be >= 0, got {max_context_tokens}")
    if min_tokens == 0:
        return None
    qlens = np.asarray(query_lens, dtype=np.int64)
    all_lens = np.asarray(seq_lens, dtype=np.int64)
    up = np.zeros(len(qlens), dtype=bool)
    held = 0
    for i in np.flatnonzero(upproject_candidates(qlens, min_tokens)).tolist():
        context = int(all_lens[i])
        if held + context <= max_context_tokens:
            up[i] = True
            held += context
    if not up.any():
        return None
    starts = np.zeros(len(qlens) + 1, dtype=np.int64)
    np.cumsum(qlens, out=starts[1:])
    seq_idx = np.repeat(np.arange(len(qlens)), qlens)
    row_is_up = up[seq_idx]
    rows = np.arange(int(starts[-1]), dtype=np.int64)
    up_seqs = np.flatnonzero(up)
    lens = all_lens[up_seqs]
    qo = np.zeros(len(up_seqs) + 1, dtype=np.int32)
    np.cumsum(qlens[up_seqs], out=qo[1:])
    kv = np.zeros(len(up_seqs) + 1, dtype=np.int32)
    np.cumsum(lens, out=kv[1:])
    slots = []
    for seq, n in zip(up_seqs, lens, strict=True):
        pos = np.arange(n, dtype=np.int64)
        table = np.asarray(block_tables[int(seq)][: -(-int(n) // block_size)], dtype=np.int64)
        slots.append(table[pos // block_size] * block_size + pos % block_size)
    return UpProjectSplit(
        up_seqs=up_seqs,
        absorbed_seqs=np.flatnonzero(~up),
        up_rows=rows[row_is_up],
        absorbed_rows=rows[~row_is_up],
        qo_indptr=qo,
        kv_indptr=kv,
        context_slots=np.concatenate(slots),
        cached_lens=lens - qlens[up_seqs],
    )


def upproject_counts(
    query_lens: Sequence[int] | np.ndarray, min_tokens: int, plan: UpProjectSplit | None
) -> tuple[int, int]:
    """(query rows a step attends up-projected, rows of chunks long enough for it that attend absorbed because the
    context bound left them out) for the backends' counters; (0, 0) when up-projection is off."""
    if not min_tokens:
        return 0, 0
    qlens = np.asarray(query_lens, dtype=np.int64)
    long_rows = int(qlens[upproject_candidates(qlens, min_tokens)].sum())
    up = 0 if plan is None else len(plan.up_rows)
    return up, long_rows - up


def check_upproject_bound(min_tokens: int, max_context_tokens: int | None) -> None:
    """A backend that may up-project (min_tokens > 0) needs the bound on a step's up-projected context."""
    if min_tokens and (max_context_tokens is None or max_context_tokens < 1):
        raise ValueError(
            "up-projected MLA prefill needs a bound on a step's up-projected context tokens "
            f"(mla_upproject_max_context_tokens >= 1), got {max_context_tokens}"
        )


def upproject_temp_bytes(
    context_tokens: int,
    num_heads: int,
    *,
    kv_lora_rank: int,
    qk_nope_head_dim: int,
    qk_rope_head_dim: int,
    v_head_dim: int,
    elem_bytes: int,
) -> int:
    """The most memory the up-projected path holds beyond an absorbed forward of the same tokens, for a step whose
    up-projected chunks hold `context_tokens` context tokens (one layer at a time: the temporaries die with it).
    Per context token: the latent row gathered from the pool (kv_lora_rank + rope), room for a contiguous copy of
    its latent part on the way into kv_b_proj (kv_lora_rank), kv_b_proj's per-head output (nope + v), the keys
    with the rope part appended (nope + rope) and a contiguous copy of the values (v) for the attention kernel.
    The per-query-row tensors (queries of nope + rope, outputs of v per head) are smaller than the absorbed path's
    (kv_lora_rank + rope in, kv_lora_rank out per head), which the profiling forward measures."""
    if context_tokens < 0 or num_heads < 1:
        raise ValueError(f"context_tokens must be >= 0 and num_heads >= 1, got {context_tokens}, {num_heads}")
    nope, rope, v = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
    per_token = (kv_lora_rank + rope) + kv_lora_rank + num_heads * ((nope + v) + (nope + rope) + v)
    return context_tokens * per_token * elem_bytes


class UpProjectPlanning:
    """What both MLA backends share of up-projected prefill (flashinfer_mla.py, torch_mla.py): the setting, the
    step's split (`mla_split`, planned by `plan_upproject` in begin_step) and the counters tests and benchmarks read."""

    upproject_min_tokens: int
    upproject_max_context_tokens: int
    upprojected_tokens: int  # query rows attended up-projected so far
    upproject_deferred_tokens: int  # rows of chunks long enough that attended absorbed: past the context bound
    _split: MLASplit | None

    def init_upproject(self, min_tokens: int, max_context_tokens: int | None) -> None:
        """The setting (refused when negative, or on without a context bound) and zeroed counters."""
        if min_tokens < 0:
            raise ValueError(f"mla_upproject_min_tokens must be >= 0, got {min_tokens}")
        check_upproject_bound(min_tokens, max_context_tokens)
        self.upproject_min_tokens = min_tokens
        self.upproject_max_context_tokens = max_context_tokens or 0
        self.upprojected_tokens = 0
        self.upproject_deferred_tokens = 0
        self._split = None

    @property
    def mla_split(self) -> MLASplit | None:
        """This step's split (None: every row absorbed)."""
        return self._split

    def plan_upproject(self, meta: AttentionMetadata, device: torch.device | str) -> UpProjectSplit | None:
        """Plan the step's split (upproject_split), count its rows, and hold it on `device` as `mla_split`."""
        plan = upproject_split(
            meta.query_lens_list, meta.seq_lens_list, meta.block_tables_list, meta.block_size,
            self.upproject_min_tokens, self.upproject_max_context_tokens,
        )  # fmt: skip
        up, deferred = upproject_counts(meta.query_lens_list, self.upproject_min_tokens, plan)
        self.upprojected_tokens += up
        self.upproject_deferred_tokens += deferred
        self._split = None if plan is None else MLASplit.on(plan, device)
        return plan


@dataclass(frozen=True)
class MLASplit:
    """A step's split on the device, what DeepSeek's attention layer reads from its backend (`attn.mla_split`)."""

    plan: UpProjectSplit
    up_rows: torch.Tensor  # int64 [Tu]
    absorbed_rows: torch.Tensor | None  # int64 [Ta]; None: every row of the step is up-projected
    context_slots: torch.Tensor  # int64 [S]

    @classmethod
    def on(cls, plan: UpProjectSplit, device: torch.device | str) -> MLASplit:
        """The split's index arrays in one host-to-device copy."""
        parts = [plan.up_rows, plan.absorbed_rows, plan.context_slots]
        buf = _to_device(np.concatenate(parts).astype(np.int64, copy=False), device)
        a, b = len(plan.up_rows), len(plan.up_rows) + len(plan.absorbed_rows)
        return cls(
            plan=plan,
            up_rows=buf[:a],
            absorbed_rows=buf[a:b] if b > a else None,
            context_slots=buf[b:],
        )


def select_sequences(meta: AttentionMetadata, seqs: np.ndarray, rows: torch.Tensor) -> AttentionMetadata:
    """The metadata of a step's sub-batch: sequences `seqs` (batch order kept) whose token rows are `rows`."""
    idx = [int(i) for i in seqs]
    qlens = [meta.query_lens_list[i] for i in idx]
    qsl = np.zeros(len(idx) + 1, dtype=np.int32)
    np.cumsum(np.asarray(qlens, dtype=np.int64), out=qsl[1:])
    device = meta.slot_mapping.device
    sel = torch.as_tensor(idx, dtype=torch.int64).to(device)
    return AttentionMetadata(
        block_size=meta.block_size,
        query_start_loc=torch.from_numpy(qsl).to(device),
        seq_lens=meta.seq_lens[sel],
        context_lens=meta.context_lens[sel],
        positions=meta.positions[rows],
        slot_mapping=meta.slot_mapping[rows],
        block_tables=meta.block_tables[sel],
        query_lens_list=qlens,
        seq_lens_list=[meta.seq_lens_list[i] for i in idx],
        context_lens_list=[meta.context_lens_list[i] for i in idx],
        block_tables_list=[meta.block_tables_list[i] for i in idx],
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
        latents [T, H, kv_lora_rank] (W_UV is the model's to apply). Used when `mla_split` is None."""
        ...

    # ---- up-projected prefill: when the step's `mla_split` is not None, the model calls these instead -------------
    @property
    def mla_split(self) -> MLASplit | None:
        """This step's split (set by begin_step; None: every row absorbed, through forward_mla)."""
        ...

    def write_latents(self, latent: torch.Tensor, k_rope: torch.Tensor, kv_cache: torch.Tensor) -> None:
        """Store every new token's latent row at the step's slots."""
        ...

    def paged_slots(self, layer_idx: int) -> torch.Tensor | None:
        """This step's slot of each new token (int64 [T]; its row in the pool viewed as [num_blocks * block_size,
        width]) when the model may write the latent rows itself (models/fused.py's mla_rope_cache) and then call
        `attend_absorbed`, as it does for a step without a split; None: `forward_mla` writes them."""
        ...

    def attend_absorbed(
        self, layer_idx: int, q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor
    ) -> torch.Tensor:
        """forward_mla's attention (latents already written) for the split's absorbed rows only: q_latent
        [Ta, H, kv_lora_rank], q_rope [Ta, H, rope] -> [Ta, H, kv_lora_rank]."""
        ...

    def attend_upprojected(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention (each chunk's queries bottom-right aligned on its context) of the split's up rows
        q [Tu, H, nope + rope] over their contexts' up-projected k [S, H, nope + rope] and v [S, H, v_head_dim]
        (packed as `mla_split.plan.qo_indptr` / `kv_indptr` say) -> [Tu, H, v_head_dim]."""
        ...
