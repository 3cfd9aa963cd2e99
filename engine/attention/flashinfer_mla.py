"""CUDA multi-head latent attention through flashinfer's MLA kernel (`BatchMLAPagedAttentionWrapper`), over the
latent-only pool [num_blocks, block_size, kv_lora_rank + rope] of engine/attention/mla.py.

The kernel takes the compressed-KV and rope parts of the cache as two tensors; both are column views of the one
pool (it reads them through their page and token strides), so a token's latent is stored once, by one
`index_copy_` of its row. One wrapper plans every eager step, prefill chunks over a cached prefix and decodes
mixed (causal, bottom-right aligned: a chunk's queries see the whole cached context and their own past), and every
layer reuses that plan, as the dense flashinfer backend does. Decode-only steps (eager, and every CUDA-graph step)
run the `mla_decode_backend` family (KUBELLM_MLA_DECODE_BACKEND; by default the same as `mla_backend`, the prefill
family, and then the same wrapper); steps with prefill rows keep `mla_backend`. `triton` takes our own split-KV
decode kernel instead (engine/attention/triton_mla_decode.py), with the same plan-then-run calls.

Up-projected prefill (`mla_upproject_min_tokens` > 0, engine/attention/mla.py): the step's long chunks attend through
flashinfer's ragged prefill (`BatchPrefillWithRaggedKVCacheWrapper` of the MLA kernel's family, head_dim_qk nope +
rope, head_dim_vo v, causal bottom-right aligned) over K/V the model up-projects from the gathered context latents;
the rest of the step (decodes, short chunks) is planned on the MLA wrapper alone. The ragged wrapper has its own
workspace, allocated only when the setting is on.

CUDA graphs: one CUDA-graph-mode wrapper per captured decode batch size over shared fixed page-table buffers;
`begin_graph_step_layout` plans the padded batch into them right before replay. The plan's launch shape depends
only on the heads per query row, which decode fixes, so a graph captured once replays any page table that fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from flashinfer import BatchPrefillWithRaggedKVCacheWrapper
from flashinfer.mla import BatchMLAPagedAttentionWrapper

from kubellm.engine.config import EngineConfig

from . import triton_mla_decode
from .base import AttentionBackend, AttentionMetadata, paged_kv_layout
from .flashinfer_backend import PlanFence, _i32, _i32_on
from .mla import (
    MLAPageTable,
    UpProjectPlanning,
    check_mla_budget,
    check_mla_work,
    decode_page_table,
    latent_cache_shape,
    mla_page_table,
    mla_page_table_from_meta,
)
from .triton_mla_decode import PageTableBuffers, TritonMLADecode

DecodeWrapper = BatchMLAPagedAttentionWrapper | TritonMLADecode

# Split-k partial outputs of the MLA kernel: 2 x SMs x tile rows x kv_lora_rank, a few tens of MB at most.
WORKSPACE_BYTES = 128 * 1024 * 1024


class FlashInferMLAAttention(UpProjectPlanning, AttentionBackend):
    name = "flashinfer-mla"
    supports_cuda_graphs = True

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
        mla_backend: str | None = None,
        mla_decode_backend: str | None = None,
        max_num_batched_tokens: int | None = None,
        max_num_seqs: int | None = None,
        upproject_min_tokens: int = 0,
        upproject_max_context_tokens: int | None = None,
        qk_nope_head_dim: int | None = None,
        v_head_dim: int | None = None,
    ):
        if num_kv_heads != 1:
            raise ValueError(f"MLA caches one latent per token (num_kv_heads 1), got {num_kv_heads}")
        if sliding_window is not None:
            raise ValueError("MLA attention has no sliding window")
        if not 0 < kv_lora_rank < head_dim:
            raise ValueError(f"kv_lora_rank {kv_lora_rank} must be below the latent row width {head_dim}")
        self.init_upproject(upproject_min_tokens, upproject_max_context_tokens)
        if upproject_min_tokens and (qk_nope_head_dim is None or v_head_dim is None):
            raise ValueError("up-projected MLA prefill needs the model's qk_nope_head_dim and v_head_dim")
        if max_num_batched_tokens is not None:  # the engine's limits: refuse at start what a step could not plan
            check_mla_budget(max_num_batched_tokens, max_num_seqs or max_num_batched_tokens, num_heads)
        super().__init__(num_heads, 1, head_dim, scale, block_size, dtype=dtype, device=device)
        self.dtype = dtype or torch.bfloat16
        if self.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"the flashinfer MLA backend runs in bfloat16 or float16, not {self.dtype}")
        self.device = torch.device(device or "cuda")
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = head_dim - kv_lora_rank
        self.mla_backend = mla_backend or "fa2"  # steps with prefill rows (and the up-projected ragged prefill)
        self.mla_decode_backend = mla_decode_backend or self.mla_backend  # decode-only steps, eager and graphs
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self._eager = BatchMLAPagedAttentionWrapper(self.workspace, backend=self.mla_backend)
        # one wrapper when the families agree (the default); else decode-only steps plan their own (one step runs
        # one of them, so they share the float workspace as the graph wrappers do)
        self._num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self._eager_decode: DecodeWrapper
        if self.mla_decode_backend == "triton":  # our split-KV kernel (triton_mla_decode.py)
            if triton_mla_decode.triton is None:
                raise ValueError("KUBELLM_MLA_DECODE_BACKEND=triton needs Triton, which is not importable here")
            self._eager_decode = TritonMLADecode(num_heads, scale, self.device, num_sms=self._num_sms)
        elif self.mla_decode_backend == self.mla_backend:
            self._eager_decode = self._eager
        else:
            self._eager_decode = BatchMLAPagedAttentionWrapper(self.workspace, backend=self.mla_decode_backend)
        self._graph_wrappers: dict[int, DecodeWrapper] = {}
        self._graph_pages = 0
        self._wrapper: DecodeWrapper = self._eager  # the wrapper this step runs
        self._rows = torch.empty(0, dtype=torch.int64, device=self.device)
        self._fence = PlanFence()
        self.qk_nope_head_dim, self.v_head_dim = qk_nope_head_dim, v_head_dim
        self._ragged: BatchPrefillWithRaggedKVCacheWrapper | None = None
        if upproject_min_tokens:
            ragged_workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
            # the MLA kernel's family (fa2 by default; KUBELLM_PREFILL_BACKEND=fa3 takes FA3, whose sm90 build has
            # the 192 / 128 head dims, for the up-projected chunks too)
            self._ragged = BatchPrefillWithRaggedKVCacheWrapper(ragged_workspace, "NHD", backend=self.mla_backend)

    @classmethod
    def options_from(cls, config: EngineConfig) -> dict[str, Any]:
        return {
            "mla_backend": config.prefill_backend,  # fa2 (default), fa3 or auto: the same families as prefill
            "mla_decode_backend": config.mla_decode_kernel,  # KUBELLM_MLA_DECODE_BACKEND (default: the above)
            "max_num_batched_tokens": config.max_num_batched_tokens,
            "max_num_seqs": config.max_num_seqs,
            "upproject_min_tokens": config.mla_upproject_min_tokens,
            "upproject_max_context_tokens": config.mla_upproject_context_budget,
        }

    def kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        return latent_cache_shape(num_blocks, self.block_size, self.head_dim)

    def _plan(self, wrapper: DecodeWrapper, table: MLAPageTable) -> None:
        if isinstance(wrapper, TritonMLADecode):  # its plan copies the table in stream order: no fence needed
            wrapper.plan(table)
            self._wrapper = wrapper
            return
        self._fence.plan(
            wrapper,
            _i32(table.qo_indptr),
            _i32(table.kv_indptr),
            _i32_on(table.kv_indices, self.device),
            _i32(table.kv_lens),
            self.num_heads,
            self.kv_lora_rank,
            self.rope_dim,
            self.block_size,
            True,  # causal, bottom-right aligned; a decode row sees its whole context either way
            self.scale,
            self.dtype,
            self.dtype,
        )
        self._wrapper = wrapper

    def begin_step(self, meta: AttentionMetadata) -> None:
        self.set_slots(meta.slot_mapping)
        plan = self.plan_upproject(meta, self.device)
        if plan is None:
            check_mla_work(meta.query_lens_list, self.num_heads)
            wrapper = self._eager_decode if meta.is_decode_only else self._eager
            self._plan(wrapper, mla_page_table_from_meta(meta))
            return
        if len(plan.absorbed_seqs):  # the MLA kernel attends the absorbed sequences only, packed in batch order
            seqs = plan.absorbed_seqs.tolist()
            qlens = [meta.query_lens_list[i] for i in seqs]
            check_mla_work(qlens, self.num_heads)
            table = mla_page_table(
                qlens, [meta.seq_lens_list[i] for i in seqs], [meta.block_tables_list[i] for i in seqs], self.block_size
            )
            self._plan(self._eager, table)
        assert self._ragged is not None and self.qk_nope_head_dim is not None
        self._fence.plan(
            self._ragged,
            _i32(plan.qo_indptr),
            _i32(plan.kv_indptr),
            self.num_heads,
            self.num_heads,
            self.qk_nope_head_dim + self.rope_dim,
            head_dim_vo=self.v_head_dim,
            causal=True,  # bottom-right aligned: a chunk's queries see its cached context and their own past
            sm_scale=self.scale,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
        )

    def set_slots(self, slot_mapping: torch.Tensor) -> None:
        """In the pool viewed as [num_blocks * block_size, width], a token's row is its slot."""
        self._rows = slot_mapping

    # ---- CUDA graphs -------------------------------------------------------------------------
    def init_cuda_graphs(self, batch_sizes: list[int], max_pages_per_seq: int) -> None:
        max_bs = max(batch_sizes)
        qo_indptr = torch.zeros(max_bs + 1, dtype=torch.int32, device=self.device)
        kv_indptr = torch.zeros(max_bs + 1, dtype=torch.int32, device=self.device)
        indices = torch.zeros(max_bs * max_pages_per_seq, dtype=torch.int32, device=self.device)
        kv_lens = torch.zeros(max_bs, dtype=torch.int32, device=self.device)
        self._graph_pages = indices.numel()
        if self.mla_decode_backend == "triton":
            buffers = PageTableBuffers(kv_indptr, indices, kv_lens)
            for b in batch_sizes:
                self._graph_wrappers[b] = TritonMLADecode(
                    self.num_heads, self.scale, self.device, num_sms=self._num_sms, buffers=buffers
                )
            return
        for b in batch_sizes:
            self._graph_wrappers[b] = BatchMLAPagedAttentionWrapper(
                self.workspace,
                use_cuda_graph=True,
                qo_indptr=qo_indptr[: b + 1],
                kv_indptr=kv_indptr[: b + 1],
                kv_indices=indices,
                kv_len_arr=kv_lens[:b],
                backend=self.mla_decode_backend,
            )

    def graph_fits(self, seq_lens: Sequence[int] | np.ndarray) -> bool:
        bs = self.block_size
        return int((-(-np.asarray(seq_lens, dtype=np.int64) // bs)).sum()) <= self._graph_pages

    def begin_graph_step(self, batch_size: int, seq_lens: Sequence[int], block_tables: Sequence[Sequence[int]]) -> None:
        self.begin_graph_step_layout(batch_size, *paged_kv_layout(seq_lens, block_tables, self.block_size))

    def begin_graph_step_layout(
        self, batch_size: int, indptr: np.ndarray, indices: np.ndarray, last_page_len: np.ndarray
    ) -> None:
        table = decode_page_table(indptr, indices, last_page_len, self.block_size)
        self._split = None  # decode only: every row absorbed
        self._plan(self._graph_wrappers[batch_size], table)

    # ---- per layer ---------------------------------------------------------------------------
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
        self.write_latents(latent, k_rope, kv_cache)
        return self.attend_absorbed(layer_idx, q_latent, q_rope, kv_cache)

    def paged_slots(self, layer_idx: int) -> torch.Tensor | None:
        """The step's slots, for the fused rotary kernel that writes each new token's latent row itself
        (mla_rope_cache: it stands in for `write_latents`); the model then calls `attend_absorbed`."""
        return self._rows

    def write_latents(self, latent: torch.Tensor, k_rope: torch.Tensor, kv_cache: torch.Tensor) -> None:
        kv_cache.view(-1, self.head_dim).index_copy_(0, self._rows, torch.cat((latent, k_rope), dim=-1))

    def attend_absorbed(
        self, layer_idx: int, q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor
    ) -> torch.Tensor:
        r = self.kv_lora_rank
        return self._wrapper.run(q_latent, q_rope, kv_cache[..., :r], kv_cache[..., r:])

    def attend_upprojected(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        assert self._ragged is not None, "no up-projected rows were planned this step"
        return self._ragged.run(q, k, v.contiguous())  # v: a column view of kv_b_proj's output


__all__ = ["FlashInferMLAAttention"]
