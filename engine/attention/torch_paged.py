"""CPU reference attention over the paged KV cache, in plain torch.

Correctness first: every sequence reads its context back from the paged cache (so a wrong slot or block
table shows up as wrong logits). Speed second: decodes of one step are attended in one padded batched call
(grouped-query heads folded into the query axis, so K/V are never repeated); prefill chunks run one
`scaled_dot_product_attention` per sequence, since padding a long prefill with short decodes wastes work.
Sliding windows are masks; with per-layer windows (Gemma 3) each distinct window gets its own masks per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kubellm.engine.loader.quantization import to_fp8

from .base import AttentionBackend, AttentionMetadata


@dataclass
class _DecodePlan:
    rows: torch.Tensor  # int64 [Bd]: the token row of each decoding sequence
    block_tables: torch.Tensor  # int64 [Bd, nb]
    context_len: int  # nb * block_size: padded keys per sequence
    mask: torch.Tensor | None  # bool [Bd, 1, 1, context_len]; None when no key is padding


@dataclass
class _PrefillPlan:
    start: int  # first token row
    end: int
    cached: int  # tokens already in the cache before this chunk
    seq_len: int
    blocks: torch.Tensor  # int64 [ceil(seq_len / block_size)]
    mask: torch.Tensor | None  # bool [q_len, seq_len] when cached > 0 (chunk attends to cache + itself)


class TorchPagedAttention(AttentionBackend):
    name = "torch"

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
        super().__init__(
            num_heads, num_kv_heads, head_dim, scale, block_size, dtype=dtype, device=device,
            sliding_window=sliding_window,
        )  # fmt: skip
        self.group = num_heads // num_kv_heads
        self._write_blocks = torch.empty(0, dtype=torch.int64)
        self._write_offsets = torch.empty(0, dtype=torch.int64)
        # window -> (the step's decode plan, its prefill plans): one entry per distinct window of the layers
        self._plans: dict[int | None, tuple[_DecodePlan | None, list[_PrefillPlan]]] = {}

    def begin_step(self, meta: AttentionMetadata) -> None:
        bs = meta.block_size
        self._write_blocks = torch.div(meta.slot_mapping, bs, rounding_mode="floor")
        self._write_offsets = meta.slot_mapping % bs
        self._plans = {w: (self._plan_decodes(meta, w), self._plan_prefills(meta, w)) for w in self.windows}

    def _plan_decodes(self, meta: AttentionMetadata, window: int | None) -> _DecodePlan | None:
        device = meta.slot_mapping.device
        bs = meta.block_size
        starts = meta.query_start_loc.tolist() if meta.num_seqs else [0]
        decode_idx = [i for i, n in enumerate(meta.query_lens_list) if n == 1]
        if not decode_idx:
            return None
        lens = [meta.seq_lens_list[i] for i in decode_idx]
        nb = -(-max(lens) // bs)
        tables = [
            meta.block_tables_list[i][:nb] + [0] * (nb - min(nb, len(meta.block_tables_list[i]))) for i in decode_idx
        ]
        ctx = nb * bs
        mask = None
        if any(n != ctx for n in lens) or (window is not None and max(lens) > window):
            keys = torch.arange(ctx, device=device)[None, :]
            lens_t = torch.tensor(lens, device=device)[:, None]
            mask = keys < lens_t
            if window is not None:  # the query sits at position len - 1
                mask &= keys > lens_t - 1 - window
            mask = mask[:, None, None, :]
        return _DecodePlan(
            rows=torch.tensor([starts[i] for i in decode_idx], dtype=torch.int64, device=device),
            block_tables=torch.tensor(tables, dtype=torch.int64, device=device),
            context_len=ctx,
            mask=mask,
        )

    def _plan_prefills(self, meta: AttentionMetadata, window: int | None) -> list[_PrefillPlan]:
        device = meta.slot_mapping.device
        bs = meta.block_size
        starts = meta.query_start_loc.tolist() if meta.num_seqs else [0]
        plans = []
        for i, n in enumerate(meta.query_lens_list):
            if n == 1:
                continue
            seq_len, cached = meta.seq_lens_list[i], meta.context_lens_list[i]
            nb = -(-seq_len // bs)
            mask = None
            if cached or (window is not None and seq_len > window):
                q_pos = torch.arange(cached, seq_len, device=device)[:, None]
                k_pos = torch.arange(seq_len, device=device)[None, :]
                mask = k_pos <= q_pos
                if window is not None:
                    mask &= k_pos > q_pos - window
            plans.append(
                _PrefillPlan(
                    start=starts[i],
                    end=starts[i] + n,
                    cached=cached,
                    seq_len=seq_len,
                    blocks=torch.tensor(meta.block_tables_list[i][:nb], dtype=torch.int64, device=device),
                    mask=mask,
                )
            )
        return plans

    def forward(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor
    ) -> torch.Tensor:
        scales = None
        if self.kv_fp8:  # stored as FP8; attention reads the FP8 values back, new tokens' included
            scales = (self.k_scales[layer_idx], self.v_scales[layer_idx])
            k8, v8 = to_fp8(k, scales[0]), to_fp8(v, scales[1])
            kv_cache[self._write_blocks, :, self._write_offsets] = torch.stack((k8, v8), dim=1)
            k, v = k8.to(q.dtype) * scales[0], v8.to(q.dtype) * scales[1]
        else:
            kv_cache[self._write_blocks, :, self._write_offsets] = torch.stack((k, v), dim=1)
        out = torch.empty_like(q)
        decode, prefills = self._plans[self.window_of(layer_idx)]
        if decode is not None:
            out[decode.rows] = self._attend_decodes(q, kv_cache, decode, scales)
        for p in prefills:
            out[p.start : p.end] = self._attend_prefill(
                q[p.start : p.end], k[p.start : p.end], v[p.start : p.end], kv_cache, p, scales
            )
        return out

    @staticmethod
    def _keys_values(
        ctx: torch.Tensor, dtype: torch.dtype, scales: tuple[float, float] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of gathered cache blocks (`ctx` [..., 2, bs, Hkv, D]) in the model dtype."""
        keys, values = ctx.select(-4, 0), ctx.select(-4, 1)
        if scales is None:
            return keys, values
        return keys.to(dtype) * scales[0], values.to(dtype) * scales[1]

    def _attend_decodes(
        self, q: torch.Tensor, kv_cache: torch.Tensor, plan: _DecodePlan, scales: tuple[float, float] | None
    ) -> torch.Tensor:
        b = plan.rows.numel()
        hkv, d = self.num_kv_heads, self.head_dim
        # One query token per sequence: fold the query heads sharing a KV head into the query axis.
        qd = q[plan.rows].view(b, hkv, self.group, d)
        keys, values = self._keys_values(kv_cache[plan.block_tables], q.dtype, scales)  # [B, nb, bs, Hkv, D] each
        keys = keys.reshape(b, plan.context_len, hkv, d).transpose(1, 2)
        values = values.reshape(b, plan.context_len, hkv, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(qd, keys, values, attn_mask=plan.mask, scale=self.scale)
        return o.reshape(b, self.num_heads, d)

    def _attend_prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        plan: _PrefillPlan,
        scales: tuple[float, float] | None,
    ) -> torch.Tensor:
        hkv, d = self.num_kv_heads, self.head_dim
        if plan.cached == 0:
            # The whole context is this chunk: attend to the new k/v directly (they were just cached too).
            keys, values, mask, causal = k, v, plan.mask, plan.mask is None
        else:
            keys, values = self._keys_values(kv_cache[plan.blocks], q.dtype, scales)  # [nb, bs, Hkv, D] each
            keys = keys.reshape(-1, hkv, d)[: plan.seq_len]
            values = values.reshape(-1, hkv, d)[: plan.seq_len]
            mask, causal = plan.mask, False
        # 4-D inputs: torch's CPU flash kernel (tiled, no [H, T, T] score matrix) only takes batched inputs.
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            keys.transpose(0, 1)[None],
            values.transpose(0, 1)[None],
            attn_mask=mask,
            is_causal=causal,
            scale=self.scale,
            enable_gqa=self.group > 1,
        )
        return o[0].transpose(0, 1)
