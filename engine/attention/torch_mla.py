"""The torch reference for multi-head latent attention over the latent-only paged pool (engine/attention/mla.py).

It plans exactly as the dense reference does (one latent "KV head" of width kv_lora_rank + rope, every query head
sharing it) and differs in what the pool holds: one row per token, read back as the keys, whose first
kv_lora_rank columns are the values. Runs on any device; on CUDA it is what the flashinfer MLA kernel is tested
against.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from kubellm.engine.config import EngineConfig

from .base import AttentionMetadata
from .mla import UpProjectPlanning, latent_cache_shape, select_sequences
from .torch_paged import TorchPagedAttention, _DecodePlan, _PrefillPlan


class TorchMLAAttention(UpProjectPlanning, TorchPagedAttention):
    name = "torch-mla"

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        block_size: int,
        *,
        kv_lora_rank: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        sliding_window: int | Sequence[int | None] | None = None,
        upproject_min_tokens: int = 0,
        upproject_max_context_tokens: int | None = None,
        qk_nope_head_dim: int | None = None,
        v_head_dim: int | None = None,
    ):
        """`qk_nope_head_dim` / `v_head_dim`: the model's, which flashinfer's MLA backend plans with (the torch
        reference reads them off the tensors). `upproject_max_context_tokens`: the bound on a step's up-projected
        context (mla.upproject_split), needed when `upproject_min_tokens` > 0."""
        if num_kv_heads != 1:
            raise ValueError(f"MLA caches one latent per token (num_kv_heads 1), got {num_kv_heads}")
        if sliding_window is not None:
            raise ValueError("MLA attention has no sliding window")
        if not 0 < kv_lora_rank < head_dim:
            raise ValueError(f"kv_lora_rank {kv_lora_rank} must be below the latent row width {head_dim}")
        self.init_upproject(upproject_min_tokens, upproject_max_context_tokens)
        super().__init__(num_heads, 1, head_dim, scale, block_size, dtype=dtype, device=device)
        self.kv_lora_rank = kv_lora_rank
        self._absorbed_slots = torch.empty(0, dtype=torch.int64)
        self._up_ranges: list[tuple[int, int, int, int, int]] = []  # per up chunk: q start, end, kv start, end, cached

    @classmethod
    def options_from(cls, config: EngineConfig) -> dict[str, Any]:
        return {
            "upproject_min_tokens": config.mla_upproject_min_tokens,
            "upproject_max_context_tokens": config.mla_upproject_context_budget,
        }

    def begin_step(self, meta: AttentionMetadata) -> None:
        super().begin_step(meta)  # the writes of every new row, and the absorbed plans of the whole step
        plan = self.plan_upproject(meta, meta.slot_mapping.device)
        if plan is None or self._split is None:
            return
        # the absorbed rows' plans, relative to their own packing (the model gathers their queries)
        self._plans = {None: (None, [])}
        if self._split.absorbed_rows is not None:
            sub = select_sequences(meta, plan.absorbed_seqs, self._split.absorbed_rows)
            self._absorbed_slots = sub.slot_mapping
            self._plans = {None: (self._plan_decodes(sub, None), self._plan_prefills(sub, None))}
        qo, kv = plan.qo_indptr.tolist(), plan.kv_indptr.tolist()
        self._up_ranges = [
            (qo[u], qo[u + 1], kv[u], kv[u + 1], int(plan.cached_lens[u])) for u in range(len(plan.up_seqs))
        ]

    def kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        return latent_cache_shape(num_blocks, self.block_size, self.head_dim)

    def forward(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor
    ) -> torch.Tensor:
        raise TypeError("the MLA backend attends through forward_mla (DeepSeek's attention layer calls it)")

    def forward_mla(
        self,
        layer_idx: int,
        q_latent: torch.Tensor,
        q_rope: torch.Tensor,
        latent: torch.Tensor,
        k_rope: torch.Tensor,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        rows = torch.cat((latent, k_rope), dim=-1)  # [T, D]
        kv_cache[self._write_blocks, self._write_offsets] = rows
        return self._attend(q_latent, q_rope, rows, kv_cache)

    def write_latents(self, latent: torch.Tensor, k_rope: torch.Tensor, kv_cache: torch.Tensor) -> None:
        kv_cache[self._write_blocks, self._write_offsets] = torch.cat((latent, k_rope), dim=-1)

    def attend_absorbed(
        self, layer_idx: int, q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor
    ) -> torch.Tensor:
        rows = kv_cache.view(-1, self.head_dim)[self._absorbed_slots]  # the absorbed rows' new latents, read back
        return self._attend(q_latent, q_rope, rows, kv_cache)

    def attend_upprojected(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty((q.shape[0], self.num_heads, v.shape[-1]))
        for q0, q1, k0, k1, cached in self._up_ranges:
            mask = None
            if cached:  # bottom-right aligned: query i (position cached + i) sees keys 0..cached + i
                q_pos = torch.arange(cached, k1 - k0, device=q.device)[:, None]
                mask = torch.arange(k1 - k0, device=q.device)[None, :] <= q_pos
            o = F.scaled_dot_product_attention(
                q[q0:q1].transpose(0, 1)[None],  # [1, H, n, nope + rope]
                k[k0:k1].transpose(0, 1)[None],
                v[k0:k1].transpose(0, 1)[None],
                attn_mask=mask,
                is_causal=not cached,
                scale=self.scale,
            )
            out[q0:q1] = o[0].transpose(0, 1)
        return out

    def _attend(
        self, q_latent: torch.Tensor, q_rope: torch.Tensor, rows: torch.Tensor, kv_cache: torch.Tensor
    ) -> torch.Tensor:
        q = torch.cat((q_latent, q_rope), dim=-1)  # [T, H, D]
        out = q.new_empty((q.shape[0], self.num_heads, self.kv_lora_rank))
        decode, prefills = self._plans[None]
        if decode is not None:
            out[decode.rows] = self._attend_latent_decodes(q, kv_cache, decode)
        for p in prefills:
            out[p.start : p.end] = self._attend_latent_prefill(q[p.start : p.end], rows[p.start : p.end], kv_cache, p)
        return out

    def _attend_latent_decodes(self, q: torch.Tensor, kv_cache: torch.Tensor, plan: _DecodePlan) -> torch.Tensor:
        b, d, r = plan.rows.numel(), self.head_dim, self.kv_lora_rank
        qd = q[plan.rows][:, None]  # [B, 1, H, D]: the heads share the one latent head, so they are the query axis
        keys = kv_cache[plan.block_tables].reshape(b, 1, plan.context_len, d)
        o = F.scaled_dot_product_attention(qd, keys, keys[..., :r], attn_mask=plan.mask, scale=self.scale)
        return o.reshape(b, self.num_heads, r)

    def _attend_latent_prefill(
        self, q: torch.Tensor, new_rows: torch.Tensor, kv_cache: torch.Tensor, plan: _PrefillPlan
    ) -> torch.Tensor:
        if plan.cached == 0:  # the whole context is this chunk: its rows were just cached, attend to them directly
            keys, mask, causal = new_rows, plan.mask, plan.mask is None
        else:
            keys = kv_cache[plan.blocks].reshape(-1, self.head_dim)[: plan.seq_len]
            mask, causal = plan.mask, False
        keys = keys[None, None]  # [1, 1, S, D]
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],  # [1, H, n, D]
            keys,
            keys[..., : self.kv_lora_rank],
            attn_mask=mask,
            is_causal=causal,
            scale=self.scale,
            enable_gqa=self.num_heads > 1,
        )
        return o[0].transpose(0, 1)
