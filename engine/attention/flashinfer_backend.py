"""CUDA paged attention through flashinfer, over the engine's NHD paged cache [num_blocks, 2, block_size, Hkv, D].

Imported only when a CUDA backend is selected (it imports flashinfer at module level). Per step the backend
plans one flashinfer wrapper on the host lists of `AttentionMetadata` — decode-only steps take the decode
wrapper, any step holding a prefill chunk takes the prefill wrapper (which handles query-length-1 rows too,
so a mixed batch is one call per layer) — and every layer reuses that plan. New K/V are written by the model's
fused rotary kernel straight into the cache (`paged_slots` / `forward_written`, models/fused.py's rope_cache), or
else with one `index_copy_` each (`write_kv_rows`: an FP8 cache through uint8 views) into a flat view of the cache,
from rows derived once per step from the slot mapping.

CUDA graphs: `init_cuda_graphs` makes one decode wrapper per captured batch size, in flashinfer's CUDA-graph
mode (fixed indptr/indices/last-page-length buffers, shared by all sizes since one graph runs at a time);
`begin_graph_step` plans the padded batch into those buffers right before the graph is replayed.

Sliding windows: flashinfer takes the window (`window_left`) at plan time, so each distinct window of the
layers (Gemma 3: its local window, and None for the global layers) has its own wrappers, all planned every step
over the same page table; each layer runs the wrapper of its window.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import flashinfer
import numpy as np
import torch

from kubellm.engine.config import EngineConfig
from kubellm.engine.loader.quantization import FP8_DTYPE, to_fp8
from kubellm.engine.transfer import to_device_async, wait_event

from .base import AttentionBackend, AttentionMetadata, paged_kv_layout, write_kv_rows

logger = logging.getLogger(__name__)

# flashinfer's float workspace (split-k partial results): tensor-core decode of a 512-row CUDA graph needs
# ~170 MB, more than the 128 MB flashinfer suggests.
WORKSPACE_BYTES = 512 * 1024 * 1024
# FA2 prefill kernels, also on Hopper: at the context lengths served here attention is a few percent of a
# prefill step's FLOPs (the weight GEMMs are the rest), so FA3 would gain little and cost one more kernel
# family to build per head size (FA3 also needs curand headers at build time). --prefill-backend fa3
# (KUBELLM_PREFILL_BACKEND=fa3) overrides (bench/offline.py times both on (a)'s shape).
PREFILL_BACKEND = "fa2"


_Wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper | flashinfer.BatchPrefillWithPagedKVCacheWrapper


def _i32(values: Sequence[int] | np.ndarray) -> torch.Tensor:
    """A host int32 tensor in pinned memory: flashinfer's planners read indptr/last-page lengths on the CPU
    and copy them to the device with non_blocking=True, which only stays asynchronous from pinned memory."""
    if isinstance(values, np.ndarray):
        host = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int32))
    else:
        host = torch.tensor(values, dtype=torch.int32)
    return host.pin_memory()


def _i32_on(values: Sequence[int] | np.ndarray, device: torch.device) -> torch.Tensor:
    """Page indices go over on the device already: flashinfer copies host indices into its CUDA-graph buffer
    with non_blocking=False, a full stream sync that would stall async scheduling for a whole GPU step."""
    return to_device_async(np.asarray(values, dtype=np.int32), torch.int32, device)


class PlanFence:
    """flashinfer's plan fills a wrapper's pinned host buffer and queues its copy to the device; with async
    scheduling the wrapper's next plan may run before the GPU reached that copy, so it waits for it first (in
    steady state it ran long ago: the GPU is a step behind the host at most)."""

    def __init__(self) -> None:
        self._copied: dict[int, torch.cuda.Event] = {}  # id(wrapper) -> its last plan's host-to-device copy

    def plan(self, wrapper, *args, **kwargs) -> None:
        copied = self._copied.get(id(wrapper))
        if copied is not None:
            wait_event(copied)
        wrapper.plan(*args, **kwargs)
        event = torch.cuda.Event()
        event.record()
        self._copied[id(wrapper)] = event


class FlashInferAttention(AttentionBackend):
    name = "flashinfer"
    supports_cuda_graphs = True

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
        use_tensor_cores: bool | None = None,
        prefill_backend: str | None = None,
        sliding_window: int | Sequence[int | None] | None = None,
    ):
        super().__init__(
            num_heads, num_kv_heads, head_dim, scale, block_size, dtype=dtype, device=device,
            sliding_window=sliding_window,
        )  # fmt: skip
        self.dtype = dtype or torch.bfloat16
        if self.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"the flashinfer backend runs in bfloat16 or float16, not {self.dtype}")
        self.device = torch.device(device or "cuda")
        # Tensor-core decode (flashinfer's prefill kernel with q_len 1) tends to win once a KV head serves >= 4
        # queries; the engine's decode_tensor_cores overrides (bench/offline.py times both and sets it).
        group = num_heads // num_kv_heads
        if use_tensor_cores is None:
            use_tensor_cores = group >= 4
        self.use_tensor_cores = use_tensor_cores
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self.prefill_backend = prefill_backend or PREFILL_BACKEND
        # one prefill and one decode wrapper per distinct window; they share the float workspace (the layers run
        # one after another on one stream)
        self._prefill = {
            w: flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend=self.prefill_backend)
            for w in self.windows
        }
        self._decode = {
            w: flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_tensor_cores=self.use_tensor_cores
            )
            for w in self.windows
        }
        self._graph_decode: dict[int, dict[int | None, flashinfer.BatchDecodeWithPagedKVCacheWrapper]] = {}
        # window -> the wrapper this step runs (one of the dicts above, never mutated)
        self._wrappers: Mapping[int | None, _Wrapper] = self._decode
        self._slots: torch.Tensor | None = None  # this step's slot mapping (set_slots)
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None  # its K and V rows, made when first needed
        self._fence = PlanFence()

    def set_kv_cache_fp8(self, k_scales: Sequence[float], v_scales: Sequence[float]) -> None:
        """FP8 pages are read with bf16 queries, which flashinfer's FA2 prefill kernels take; the FA3 family is
        left for bf16 caches (its mixed-dtype support is not what this engine was tested with)."""
        super().set_kv_cache_fp8(k_scales, v_scales)
        if self.prefill_backend != "fa2":
            logger.info("fp8 KV cache: prefill attention on flashinfer's fa2 kernels (not %s)", self.prefill_backend)
            self.prefill_backend = "fa2"
            self._prefill = {
                w: flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend="fa2")
                for w in self.windows
            }

    @classmethod
    def options_from(cls, config: EngineConfig) -> dict[str, Any]:
        return {"use_tensor_cores": config.decode_tensor_cores, "prefill_backend": config.prefill_backend}

    def _plan(self, wrapper, *args, **kwargs) -> None:
        self._fence.plan(wrapper, *args, **kwargs)

    # ---- per-step planning -------------------------------------------------------------------
    def _plan_args(self, window: int | None) -> dict:
        kv_dtype = FP8_DTYPE if self.kv_fp8 else self.dtype
        args = {"q_data_type": self.dtype, "kv_data_type": kv_dtype, "sm_scale": self.scale}
        if window is not None:
            args["window_left"] = window - 1  # flashinfer: keys q-window_left..q (inclusive)
        return args

    def begin_step(self, meta: AttentionMetadata) -> None:
        indptr, indices, last = paged_kv_layout(meta.seq_lens_list, meta.block_tables_list, self.block_size)
        h, hkv, d, bs = self.num_heads, self.num_kv_heads, self.head_dim, self.block_size
        pages = _i32_on(indices, self.device)
        if meta.is_decode_only:
            kv_indptr, last_len = _i32(indptr), _i32(last)
            for w, wrapper in self._decode.items():
                self._plan(wrapper, kv_indptr, pages, last_len, h, hkv, d, bs, **self._plan_args(w))
            self._wrappers = self._decode
        else:
            qo = np.zeros(meta.num_seqs + 1, dtype=np.int32)
            np.cumsum(meta.query_lens_list, out=qo[1:])
            qo_indptr, kv_indptr, last_len = _i32(qo), _i32(indptr), _i32(last)
            for w, wrapper in self._prefill.items():
                self._plan(
                    wrapper, qo_indptr, kv_indptr, pages, last_len, h, hkv, d, bs, causal=True, **self._plan_args(w)
                )
            self._wrappers = self._prefill
        self.set_slots(meta.slot_mapping)

    def set_slots(self, slot_mapping: torch.Tensor) -> None:
        """Where this step's new K and V go. Their rows in the cache viewed as [num_blocks * 2 * block_size, Hkv,
        D] are made by the first layer that writes through `forward` (plain tensor ops, so a CUDA graph captures them
        and recomputes them from a static slot buffer); a step whose layers all write through the fused rotary
        kernel (`paged_slots`) never makes them."""
        self._slots = slot_mapping
        self._rows = None

    def _kv_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rows is None:
            if self._slots is None:
                raise RuntimeError("begin_step (or set_slots) must run before the layers")
            bs = self.block_size
            k_rows = torch.div(self._slots, bs, rounding_mode="floor") * bs + self._slots
            self._rows = (k_rows, k_rows + bs)
        return self._rows

    def paged_slots(self, layer_idx: int) -> torch.Tensor | None:
        """The slot mapping, for the fused rotary + KV write: bf16/fp16 caches only (an FP8 cache stores scaled
        values, written by `forward`)."""
        return None if self.kv_fp8 else self._slots

    def forward_written(self, layer_idx: int, q: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        return self._wrappers[self.window_of(layer_idx)].run(q, kv_cache)

    # ---- CUDA graphs -------------------------------------------------------------------------
    def init_cuda_graphs(self, batch_sizes: list[int], max_pages_per_seq: int) -> None:
        """One CUDA-graph-mode decode wrapper per batch size, over shared fixed page-table buffers."""
        max_bs = max(batch_sizes)
        indptr = torch.zeros(max_bs + 1, dtype=torch.int32, device=self.device)
        indices = torch.zeros(max_bs * max_pages_per_seq, dtype=torch.int32, device=self.device)
        last = torch.zeros(max_bs, dtype=torch.int32, device=self.device)
        self._graph_pages = indices.numel()
        for b in batch_sizes:
            self._graph_decode[b] = {
                w: flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    self.workspace,
                    "NHD",
                    use_cuda_graph=True,
                    use_tensor_cores=self.use_tensor_cores,
                    paged_kv_indptr_buffer=indptr[: b + 1],
                    paged_kv_indices_buffer=indices,
                    paged_kv_last_page_len_buffer=last[:b],
                )
                for w in self.windows
            }

    def graph_fits(self, seq_lens: Sequence[int] | np.ndarray) -> bool:
        """Whether the padded batch's page table fits the fixed buffers (else the step runs eagerly)."""
        bs = self.block_size
        return int((-(-np.asarray(seq_lens, dtype=np.int64) // bs)).sum()) <= self._graph_pages

    def begin_graph_step(self, batch_size: int, seq_lens: Sequence[int], block_tables: Sequence[Sequence[int]]) -> None:
        """Plan the graph wrapper of `batch_size` (rows already padded by the caller) before capture or replay."""
        self.begin_graph_step_layout(batch_size, *paged_kv_layout(seq_lens, block_tables, self.block_size))

    def begin_graph_step_layout(
        self, batch_size: int, indptr: np.ndarray, indices: np.ndarray, last_page_len: np.ndarray
    ) -> None:
        """`begin_graph_step` from a page-table triple the caller already built (see `paged_kv_layout_flat`)."""
        wrappers = self._graph_decode[batch_size]
        h, hkv, d, bs = self.num_heads, self.num_kv_heads, self.head_dim, self.block_size
        pages = _i32_on(indices, self.device)
        kv_indptr, last_len = _i32(indptr), _i32(last_page_len)
        for w, wrapper in wrappers.items():  # every window's wrapper fills the same shared page-table buffers
            self._plan(wrapper, kv_indptr, pages, last_len, h, hkv, d, bs, **self._plan_args(w))
        self._wrappers = wrappers

    # ---- per layer ---------------------------------------------------------------------------
    def forward(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor
    ) -> torch.Tensor:
        flat = kv_cache.view(-1, self.num_kv_heads, self.head_dim)
        wrapper = self._wrappers[self.window_of(layer_idx)]
        k_rows, v_rows = self._kv_rows()
        if self.kv_fp8:  # e4m3 cache: stored as k / k_scale, the kernel multiplies the scales back in
            k_scale, v_scale = self.k_scales[layer_idx], self.v_scales[layer_idx]
            write_kv_rows(flat, k_rows, to_fp8(k, k_scale))
            write_kv_rows(flat, v_rows, to_fp8(v, v_scale))
            return wrapper.run(q, kv_cache, k_scale=k_scale, v_scale=v_scale)
        write_kv_rows(flat, k_rows, k)
        write_kv_rows(flat, v_rows, v)
        return wrapper.run(q, kv_cache)


__all__ = ["FlashInferAttention", "PlanFence", "paged_kv_layout"]
