"""The attention backend interface and the per-step metadata every backend plans from.

The model calls `forward(layer_idx, q, k, v, kv_cache)` per layer and knows nothing of paging; a backend
(torch reference on CPU, flashinfer on CUDA) turns one `AttentionMetadata` per step into whatever it needs
(gather indices and masks, or flashinfer plans) in `begin_step`, once, shared by all layers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import torch

from kubellm.engine.config import EngineConfig
from kubellm.engine.forward_batch import ForwardBatch


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
    """Per-layer paged KV cache layout (flashinfer's NHD): [num_blocks, 2 (K, V), block_size, heads, head_dim]."""
    return (num_blocks, 2, block_size, num_kv_heads, head_dim)


@dataclass
class AttentionMetadata:
    """One step's batch layout: tokens are packed sequence after sequence, in ForwardBatch order."""

    block_size: int
    # device tensors
    query_start_loc: torch.Tensor  # int32 [B+1]: sequence b's new tokens are rows [qsl[b], qsl[b+1])
    seq_lens: torch.Tensor  # int32 [B]: context length after this step (start_pos + new tokens)
    context_lens: torch.Tensor  # int32 [B]: tokens already cached before this step (start_pos)
    positions: torch.Tensor  # int64 [T]
    slot_mapping: torch.Tensor  # int64 [T]: block_id * block_size + offset of each new token
    block_tables: torch.Tensor  # int32 [B, max_blocks], right-padded with 0 (padding is never read)
    # the same facts as Python lists, for CPU-side planning without device syncs
    query_lens_list: list[int]
    seq_lens_list: list[int]
    context_lens_list: list[int]
    block_tables_list: list[list[int]]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens_list)

    @property
    def is_decode_only(self) -> bool:
        return all(n == 1 for n in self.query_lens_list)

    @classmethod
    def from_batch(cls, batch: ForwardBatch, block_size: int, device: torch.device | str = "cpu") -> AttentionMetadata:
        """Build the metadata on the host with numpy (one Python pass over the sequences, none over tokens or
        blocks), then move it to `device` in two copies (one int32, one int64 buffer; pinned on CUDA)."""
        seqs = batch.seqs
        query_lens = [len(s.token_ids) for s in seqs]
        context_lens = [s.start_pos for s in seqs]
        tables = [s.block_ids for s in seqs]  # the KV manager's lists, read only (no copy)
        n_blocks = [len(t) for t in tables]
        seq_lens = [c + n for c, n in zip(context_lens, query_lens, strict=True)]
        for seq, n, end, nb in zip(seqs, query_lens, seq_lens, n_blocks, strict=True):
            if n == 0:
                raise ValueError(f"request {seq.request_id}: a scheduled sequence has no tokens to compute")
            if nb * block_size < end:
                raise ValueError(f"request {seq.request_id}: {nb} blocks of {block_size} cannot hold {end} tokens")
        b = len(seqs)
        width = max(n_blocks, default=0)
        qlens = np.asarray(query_lens, dtype=np.int64)
        qsl = np.zeros(b + 1, dtype=np.int64)
        np.cumsum(qlens, out=qsl[1:])
        # int32 pack: query_start_loc [B+1], seq_lens [B], context_lens [B], block_tables [B * width]
        i32 = np.zeros(3 * b + 1 + b * width, dtype=np.int32)
        i32[: b + 1] = qsl
        i32[b + 1 : 2 * b + 1] = seq_lens
        i32[2 * b + 1 : 3 * b + 1] = context_lens
        padded = i32[3 * b + 1 :].reshape(b, width)
        flat = np.fromiter(chain.from_iterable(tables), dtype=np.int32, count=sum(n_blocks))
        if width and flat.size == b * width:
            padded[:] = flat.reshape(b, width)
        elif flat.size:
            padded[np.arange(width) < np.asarray(n_blocks)[:, None]] = flat  # row-major: each row's blocks in order
        # int64 pack: positions [T], slot_mapping [T]
        total = int(qsl[-1])
        ctx = np.asarray(context_lens, dtype=np.int64)
        if total == b:  # decode-only: one token per sequence at position start_pos
            seq_idx = np.arange(b)
            pos = ctx
        else:
            seq_idx = np.repeat(np.arange(b), qlens)
            pos = np.arange(total, dtype=np.int64) + np.repeat(ctx - qsl[:-1], qlens)
        i64 = np.empty(2 * total, dtype=np.int64)
        i64[:total] = pos
        i64[total:] = padded[seq_idx, pos // block_size].astype(np.int64) * block_size + pos % block_size
        t32, t64 = _to_device(i32, device), _to_device(i64, device)
        return cls(
            block_size=block_size,
            query_start_loc=t32[: b + 1],
            seq_lens=t32[b + 1 : 2 * b + 1],
            context_lens=t32[2 * b + 1 : 3 * b + 1],
            positions=t64[:total],
            slot_mapping=t64[total:],
            block_tables=t32[3 * b + 1 :].view(b, width),
            query_lens_list=query_lens,
            seq_lens_list=seq_lens,
            context_lens_list=context_lens,
            block_tables_list=tables,
        )


def _to_device(array: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """One host-to-device copy; from pinned memory on CUDA so it does not block the host."""
    host = torch.from_numpy(array)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def flatten_block_tables(block_tables: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """All block ids, table after table, as one int32 array (one conversion, no per-block Python work),
    and each table's length (int64)."""
    n_blocks = np.fromiter((len(t) for t in block_tables), dtype=np.int64, count=len(block_tables))
    flat = np.fromiter(chain.from_iterable(block_tables), dtype=np.int32, count=int(n_blocks.sum()))
    return flat, n_blocks


def paged_kv_layout_flat(
    seq_lens: np.ndarray, flat: np.ndarray, n_blocks: np.ndarray, block_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`paged_kv_layout` from `flatten_block_tables`'s output, in numpy only: each table's first
    ceil(seq_len / block_size) entries."""
    lens = np.asarray(seq_lens, dtype=np.int64)
    pages = -(-lens // block_size)
    indptr = np.zeros(len(lens) + 1, dtype=np.int32)
    np.cumsum(pages, out=indptr[1:])
    if np.array_equal(pages, n_blocks):
        indices = flat
    else:
        starts = np.zeros(len(lens), dtype=np.int64)
        np.cumsum(n_blocks[:-1], out=starts[1:])
        within = np.arange(flat.size, dtype=np.int64) - np.repeat(starts, n_blocks)
        indices = flat[within < np.repeat(pages, n_blocks)]
    last = (lens - (pages - 1) * block_size).astype(np.int32)
    return indptr, indices, last


def paged_kv_layout(
    seq_lens: Sequence[int], block_tables: Sequence[Sequence[int]], block_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """flashinfer's page-table triple for sequences of `seq_lens` tokens, as int32 numpy arrays:
    (indptr [B+1], indices [sum of pages], last_page_len [B])."""
    flat, n_blocks = flatten_block_tables(block_tables)
    return paged_kv_layout_flat(np.asarray(seq_lens, dtype=np.int64), flat, n_blocks, block_size)


def write_kv_rows(flat: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """`flat.index_copy_(0, rows, values)` for a cache of any dtype: `flat` [R, Hkv, D] (a paged cache viewed by
    row), `values` [T, Hkv, D] of the cache's dtype. Float8 caches are written through uint8 views of both, the
    same bytes moved: CUDA's index_copy_ has no float8 kernel. Plain tensor ops, so a CUDA graph captures it."""
    if values.dtype != flat.dtype:
        raise ValueError(f"KV rows of {values.dtype} cannot be written into a {flat.dtype} cache")
    if flat.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        flat, values = flat.view(torch.uint8), values.view(torch.uint8)
    flat.index_copy_(0, rows, values)


class AttentionBackend(ABC):
    """Paged attention over the engine's KV cache; one instance serves all layers of one model."""

    name: str = "base"
    supports_cuda_graphs: bool = False  # True: the graph-capture methods below are implemented

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        block_size: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        sliding_window: int | Sequence[int | None] | None = None,
    ):
        """`dtype`/`device`: the model's; a backend that allocates buffers or plans kernels up front needs them.
        `sliding_window` W: a query at position p sees keys p-W+1..p only (transformers' convention); one W for
        every layer (Mistral), or one entry per layer, None for a full-attention layer (Gemma 3)."""
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.block_size = block_size
        if sliding_window is None or isinstance(sliding_window, int):
            self.layer_windows: list[int | None] | None = None
            self.sliding_window = sliding_window
        else:
            self.layer_windows = [None if w is None else int(w) for w in sliding_window]
            self.sliding_window = None
        for w in self.windows:
            if w is not None and w < 1:
                raise ValueError(f"sliding window must be >= 1 token, got {w}")
        self.kv_fp8 = False  # set_kv_cache_fp8: the cache holds float8_e4m3fn K/V divided by per-layer scales
        self.k_scales: list[float] = []
        self.v_scales: list[float] = []

    def set_kv_cache_fp8(self, k_scales: Sequence[float], v_scales: Sequence[float]) -> None:
        """Store K/V in FP8 (e4m3): layer i's keys as k / k_scales[i], values as v / v_scales[i]."""
        self.kv_fp8 = True
        self.k_scales, self.v_scales = [float(s) for s in k_scales], [float(s) for s in v_scales]

    @classmethod
    def options_from(cls, config: EngineConfig) -> dict[str, Any]:
        """Keyword arguments of this backend's constructor that come from the engine config (none here)."""
        return {}

    def kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        """One layer's paged cache of `num_blocks` blocks: the pool's layout and its bytes per token come from here
        (the latent backends of engine/attention/mla.py store one latent row per token instead of K and V)."""
        return kv_cache_shape(num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def windows(self) -> list[int | None]:
        """The distinct windows the layers use (None: full attention), in first-use order: one plan each."""
        if self.layer_windows is None:
            return [self.sliding_window]
        return list(dict.fromkeys(self.layer_windows))

    def window_of(self, layer_idx: int) -> int | None:
        if self.layer_windows is None:
            return self.sliding_window
        return self.layer_windows[layer_idx]

    @abstractmethod
    def begin_step(self, meta: AttentionMetadata) -> None:
        """Plan the step once (indices, masks, kernel plans); every layer's forward reuses the plan."""

    @abstractmethod
    def forward(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D]: store k/v at the step's slots, then attend causally over each
        sequence's cached context plus its new tokens; returns [T, Hq, D]."""

    def paged_slots(self, layer_idx: int) -> torch.Tensor | None:
        """This step's slot of each new token (block * block_size + offset, int64 [T]) when the caller may write
        layer `layer_idx`'s new K and V into its cache itself, in kv_cache_shape's layout and the cache's dtype,
        and then call `forward_written` (the fused rotary + KV write of models/fused.py); None: `forward` writes
        them (this backend's default)."""
        return None

    def forward_written(self, layer_idx: int, q: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        """`forward` for a layer whose new K/V the caller already wrote at `paged_slots`: attention only."""
        raise NotImplementedError(f"the {self.name} attention backend writes K and V itself (paged_slots is None)")

    # ---- CUDA graphs for decode (the model runner calls these only when supports_cuda_graphs) ------------
    def set_slots(self, slot_mapping: torch.Tensor) -> None:
        """Point the KV writes at `slot_mapping` with tensor ops a CUDA graph can capture."""
        raise NotImplementedError(f"the {self.name} attention backend does not support CUDA graphs")

    def init_cuda_graphs(self, batch_sizes: list[int], max_pages_per_seq: int) -> None:
        """Allocate the fixed buffers graphs of these batch sizes read their page tables from."""
        raise NotImplementedError(f"the {self.name} attention backend does not support CUDA graphs")

    def graph_fits(self, seq_lens: Sequence[int] | np.ndarray) -> bool:
        """Whether a padded decode batch of these lengths fits the fixed buffers (else it runs eagerly)."""
        raise NotImplementedError(f"the {self.name} attention backend does not support CUDA graphs")

    def begin_graph_step(self, batch_size: int, seq_lens: Sequence[int], block_tables: Sequence[Sequence[int]]) -> None:
        """Plan the graph of `batch_size` (rows padded by the caller) before capture or replay."""
        raise NotImplementedError(f"the {self.name} attention backend does not support CUDA graphs")

    def begin_graph_step_layout(
        self, batch_size: int, indptr: np.ndarray, indices: np.ndarray, last_page_len: np.ndarray
    ) -> None:
        """`begin_graph_step` from a page-table triple the caller already built (see `paged_kv_layout_flat`)."""
        raise NotImplementedError(f"the {self.name} attention backend does not support CUDA graphs")
