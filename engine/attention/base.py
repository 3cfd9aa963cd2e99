"""The attention backend interface and the per-step metadata every backend plans from.

The model calls `forward(layer_idx, q, k, v, kv_cache)` per layer and knows nothing of paging; a backend
(torch reference on CPU, flashinfer on CUDA) turns one `AttentionMetadata` per step into whatever it needs
(gather indices and masks, or flashinfer plans) in `begin_step`, once, shared by all layers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

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
    def max_query_len(self) -> int:
        return max(self.query_lens_list, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_list, default=0)

    @property
    def is_decode_only(self) -> bool:
        return all(n == 1 for n in self.query_lens_list)

    @classmethod
    def from_batch(cls, batch: ForwardBatch, block_size: int, device: torch.device | str = "cpu") -> AttentionMetadata:
        """Build the metadata on the host, then move it to `device` in one go."""
        query_lens, seq_lens, context_lens, tables = [], [], [], []
        positions: list[int] = []
        slots: list[int] = []
        for seq in batch.seqs:
            n = len(seq.token_ids)
            if n == 0:
                raise ValueError(f"request {seq.request_id}: a scheduled sequence has no tokens to compute")
            end = seq.start_pos + n
            if len(seq.block_ids) * block_size < end:
                raise ValueError(
                    f"request {seq.request_id}: {len(seq.block_ids)} blocks of {block_size} cannot hold {end} tokens"
                )
            query_lens.append(n)
            seq_lens.append(end)
            context_lens.append(seq.start_pos)
            tables.append(list(seq.block_ids))
            for pos in range(seq.start_pos, end):
                positions.append(pos)
                slots.append(seq.block_ids[pos // block_size] * block_size + pos % block_size)
        qsl = [0]
        for n in query_lens:
            qsl.append(qsl[-1] + n)
        width = max((len(t) for t in tables), default=0)
        padded = [t + [0] * (width - len(t)) for t in tables]

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        return cls(
            block_size=block_size,
            query_start_loc=tensor(qsl, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            context_lens=tensor(context_lens, torch.int32),
            positions=tensor(positions, torch.int64),
            slot_mapping=tensor(slots, torch.int64),
            block_tables=tensor(padded, torch.int32).reshape(len(padded), width),
            query_lens_list=query_lens,
            seq_lens_list=seq_lens,
            context_lens_list=context_lens,
            block_tables_list=tables,
        )


class AttentionBackend(ABC):
    """Paged attention over the engine's KV cache; one instance serves all layers of one model."""

    name: str = "base"
    supports_cuda_graphs: bool = False  # True: init_cuda_graphs / begin_graph_step / set_slots exist

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
    ):
        """`dtype`/`device`: the model's; a backend that allocates buffers or plans kernels up front needs them."""
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.block_size = block_size

    @abstractmethod
    def begin_step(self, meta: AttentionMetadata) -> None:
        """Plan the step once (indices, masks, kernel plans); every layer's forward reuses the plan."""

    @abstractmethod
    def forward(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D]: store k/v at the step's slots, then attend causally over each
        sequence's cached context plus its new tokens; returns [T, Hq, D]."""
