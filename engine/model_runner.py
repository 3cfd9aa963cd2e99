"""`ModelRunner`: owns the weights and the paged KV cache on the device; turns a ForwardBatch into logits.

The scheduler never sees a tensor: it hands over token ids, positions and block tables (ForwardBatch); the
runner computes float32 logits for the sequences that sample this step, in batch order, and (as a StepRunner,
engine/step_runner.py) hands them to the engine's sampler.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from kubellm.engine import sampling_kernels
from kubellm.engine.attention import AttentionBackend, AttentionMetadata, TorchPagedAttention, select_backend_class
from kubellm.engine.attention.base import flatten_block_tables, paged_kv_layout_flat
from kubellm.engine.attention.mla import upproject_temp_bytes
from kubellm.engine.config import EngineConfig
from kubellm.engine.forward_batch import ForwardBatch, ScheduledSeq, TokenFill
from kubellm.engine.loader import LoadedModel, parse_dtype
from kubellm.engine.loader.fp8_weights import Fp8Weights
from kubellm.engine.loader.hf_dir import SafetensorsWeights
from kubellm.engine.loader.quantization import (
    FP8_DTYPE,
    K_SCALE_DIVISOR,
    KV_CALIBRATION_TEXT,
    ONLINE_FP8,
    V_SCALE_DIVISOR,
    resolve_scheme,
)
from kubellm.engine.models import build_model, fp8_gemm, fp8_tune, fused, gemv, moe
from kubellm.engine.models.causal_lm import deferred_weights, is_deferred
from kubellm.engine.step_runner import Sample, StepResult
from kubellm.engine.transfer import to_device_async

logger = logging.getLogger(__name__)

GRAPH_MAX_BATCH = 512  # larger decode batches run eagerly: launch overhead is small next to their work


def cuda_graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to max_num_seqs (capped): a padded batch wastes at most 7 rows."""
    cap = max(1, min(max_num_seqs, GRAPH_MAX_BATCH))
    sizes = [b for b in (1, 2, 4, 8) if b <= cap] + list(range(16, cap + 1, 8))
    if sizes[-1] != cap:
        sizes.append(cap)
    return sizes


def available_cpus() -> int:
    """CPUs this process may really use: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def configure_cpu_threads(num_threads: int = 0) -> int:
    """`num_threads` intra-op threads (0: one per usable CPU): torch's default counts the host's cores, which
    oversubscribes a CPU-limited pod and slows every matmul."""
    wanted = num_threads or available_cpus()
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    return wanted


@contextmanager
def absorbed_only(attn: AttentionBackend) -> Iterator[None]:
    """An MLA backend attends every row absorbed inside (its up-projected prefill off); other backends unchanged."""
    min_tokens = getattr(attn, "upproject_min_tokens", 0)
    if not min_tokens:
        yield
        return
    attn.upproject_min_tokens = 0  # type: ignore[attr-defined]
    try:
        yield
    finally:
        attn.upproject_min_tokens = min_tokens  # type: ignore[attr-defined]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA GPU")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"ModelRunner runs on cpu or cuda, not {name!r} (device 'sim' uses the sim runner)")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return parse_dtype(name)


class ModelRunner:
    samples_logits = True
    supports_token_fill = True  # execute() takes placeholder tokens from the previous step's device tensor

    def __init__(self, loaded: LoadedModel, config: EngineConfig, tp_rank: int = 0, tp_size: int = 1):
        """tp_rank/tp_size: this process's share of a tensor-parallel replica (engine/tp_worker.py starts the
        ranks and the process group); every rank runs the same execute() on the same batch."""
        self.config = config
        self.model_config = loaded.config
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.device = resolve_device(config.device)
        if self.device.type == "cuda" and tp_size > 1:  # one GPU per rank
            self.device = torch.device("cuda", tp_rank)
            torch.cuda.set_device(self.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if self.device.type == "cpu":
            configure_cpu_threads(config.num_threads)
        fused.configure(config.fused_kernels, config.rope_cache, config.fused_qk_norm, config.moe_sum_norm)
        gemv.configure(config.gemv_kernel)
        fp8_gemm.configure(config.fp8_gemm, config.fp8_splitk)
        sampling_kernels.configure(config.fused_sampler)
        moe.configure(config.moe_kernel)
        self.block_size = config.block_size
        c = loaded.config
        self.quantization = resolve_scheme(loaded.quantization, config.quantization, loaded.name)
        # FP8 on CUDA: linear and expert weights get GPU memory only as they load, in the dtype they load in
        with deferred_weights() if self.quantization is not None and self.device.type == "cuda" else nullcontext():
            self.model = build_model(loaded.config, self.dtype, self.device, tp_rank, tp_size)
        if tp_size > 1:  # shard-sized weight GEMMs of decode rows: the Triton kernel beats cuBLAS there
            for module in self.model.modules():
                if hasattr(module, "matmul"):
                    module.matmul = gemv.linear
        weights: Mapping[str, torch.Tensor] = loaded.weights  # or an FP8 view of them
        if self.quantization is ONLINE_FP8:
            weights = Fp8Weights(weights, ONLINE_FP8, self.dtype)
        if self.device.type == "cuda" and self.quantization is None and isinstance(weights, SafetensorsWeights):
            weights = weights.streaming_to(self.device)  # files straight to the GPU through pinned buffers
        started = time.perf_counter()
        self.model.load_weights(weights)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.weights_load_seconds = time.perf_counter() - started  # reading and moving the weights (bench/startup.py)
        self.model.eval()
        unloaded = [name for name, p in self.model.named_parameters() if is_deferred(p)]
        if unloaded:
            raise RuntimeError(f"weights left without storage after loading: {', '.join(unloaded[:4])}")
        self.weight_bytes = self._weight_bytes()
        self.fp8_tune_seconds = 0.0
        if self.device.type == "cuda" and config.fp8_gemm == "tune" and self.quantization is not None:
            self._tune_fp8()
        if tp_rank == 0:
            logger.info(
                "weights on %s: %s%s", self.device,
                ", ".join(f"{dtype} {n / 2**30:.2f} GiB" for dtype, n in self.weight_bytes.items()),
                f" ({self.quantization.describe()})" if self.quantization else "",
            )  # fmt: skip
        moe_kernel = moe.kernel_choice(self.device) if c.num_experts else None
        if moe_kernel and tp_rank == 0:
            logger.info(
                "MoE: %d experts, %d active per token, expert width %d (of it %d on this rank); MoE kernel: %s",
                c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.moe_intermediate_size // tp_size,
                moe_kernel,
            )  # fmt: skip
        # this rank's KV heads: the KV cache is split by head, except MLA's one latent head, which every rank holds
        self.num_kv_heads = c.num_key_value_heads if c.kv_lora_rank else c.num_key_value_heads // tp_size
        latent = bool(c.kv_lora_rank)  # MLA: a latent-only pool, one row of kv_lora_rank + rope per token
        self.kv_dtype = FP8_DTYPE if config.kv_cache_dtype in ("fp8", "fp8_e4m3") else self.dtype
        if self.kv_dtype == FP8_DTYPE and latent:
            raise ValueError("--kv-cache-dtype fp8 is not supported for MLA (DeepSeek) models yet")
        backend_cls = select_backend_class(config.attention_backend, self.device, latent=latent)
        self.attn: AttentionBackend = backend_cls(
            c.num_attention_heads // tp_size,
            self.num_kv_heads,
            c.head_dim,
            c.attention_scale,
            config.block_size,
            dtype=self.dtype,
            device=self.device,
            sliding_window=self._sliding_window(c, config),
            **(
                {"kv_lora_rank": c.kv_lora_rank, "qk_nope_head_dim": c.qk_nope_head_dim, "v_head_dim": c.v_head_dim}
                if latent
                else {}
            ),
            **backend_cls.options_from(config),
        )
        # MLA's up-projected prefill: per-layer K/V temporaries for at most the step bound's context tokens, which
        # the memory profile reserves on top of its (absorbed) forward
        self.upproject_reserve_bytes = 0
        if latent and config.mla_upproject_min_tokens:
            bound = config.mla_upproject_context_budget
            self.upproject_reserve_bytes = upproject_temp_bytes(
                bound, self.attn.num_heads, kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim,
                qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim,
                elem_bytes=torch.empty((), dtype=self.dtype).element_size(),
            )  # fmt: skip
            if tp_rank == 0:
                logger.info(
                    "MLA: prefill chunks of %d+ new tokens attend up-projected (the rest absorbed), at most %d "
                    "context tokens a step: %.1f MiB of per-layer K/V temporaries reserved",
                    config.mla_upproject_min_tokens, bound, self.upproject_reserve_bytes / 2**20,
                )  # fmt: skip
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        self.max_model_len = min(config.max_model_len or c.max_position_embeddings, c.max_position_embeddings)
        if self.kv_dtype == FP8_DTYPE:
            k_scales, v_scales = self._kv_scales(loaded)
            self.attn.set_kv_cache_fp8(k_scales, v_scales)
        elif loaded.kv_cache_fp8 and tp_rank == 0:
            logger.info("the checkpoint carries FP8 KV-cache scales: --kv-cache-dtype fp8 would use them")
        # CUDA graphs for decode: padded rows write into one extra block the scheduler never hands out.
        # Under tensor parallelism the graphs hold the NCCL all-reduces (engine/parallel.py; tp_worker.py can turn
        # them off before the KV cache is allocated).
        self.use_cuda_graphs = (
            self.device.type == "cuda" and not config.enforce_eager and self.attn.supports_cuda_graphs
        )
        if self.use_cuda_graphs and moe_kernel == "torch reference":  # it reads expert counts back to the host
            logger.warning("MoE layers run the torch reference on CUDA: decode runs eagerly, without CUDA graphs")
            self.use_cuda_graphs = False
        self.dummy_block = -1
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_sizes: list[int] = []
        self._graph_inputs = torch.empty(0)
        self.graph_capture_seconds = 0.0
        self.graph_replays = 0
        self.memory_profile: dict[str, float] = {}

    def _tune_fp8(self) -> None:
        """--fp8-gemm tune: time the FP8 GEMM routes of this model's FP8 linear layers at every batch-size bucket up
        to the token budget, before the memory profile and graph capture see them (models/fp8_tune.py)."""
        layers = [
            fp8_tune.Fp8Layer(m.weight, m.fp8.scale, m.fp8.block_size, m.fp8.input_scale)
            for m in self.model.modules()
            if getattr(m, "fp8", None) is not None
        ]
        if not layers:
            return
        started = time.perf_counter()
        rows = max(self.config.max_num_batched_tokens, self.config.max_num_seqs)
        fp8_gemm.set_tuned(fp8_tune.tune(layers, rows, self.dtype, splitk=self.config.fp8_splitk))
        self.fp8_tune_seconds = time.perf_counter() - started

    def _weight_bytes(self) -> dict[str, int]:
        """Bytes of this rank's weights per dtype (FP8 layers next to the rest), counting a tied head once."""
        out: dict[str, int] = {}
        for p in self.model.parameters():
            name = str(p.dtype).removeprefix("torch.")
            out[name] = out.get(name, 0) + p.numel() * p.element_size()
        return out

    def _kv_scales(self, loaded: LoadedModel) -> tuple[list[float], list[float]]:
        """Per-layer FP8 KV scales: the checkpoint's k_scale/v_scale where it has them; else computed at start
        (--calculate-kv-scales) or 1.0."""
        n = self.model_config.num_hidden_layers
        read = getattr(loaded.weights, "kv_scales", None)
        found = [read(f"model.layers.{i}.self_attn") if read is not None else None for i in range(n)]
        if all(found):
            source, k, v = "the checkpoint's k/v scales", [f[0] for f in found], [f[1] for f in found]  # type: ignore[index]
        elif self.config.calculate_kv_scales:
            source, (k, v) = "scales computed at start (--calculate-kv-scales)", self._calibrate_kv_scales(loaded)
        else:
            source, k, v = "scales 1.0", [1.0] * n, [1.0] * n
        if self.tp_rank == 0:
            logger.info("KV cache in fp8 (e4m3): %s", source)
        return k, v

    @torch.inference_mode()
    def _calibrate_kv_scales(self, loaded: LoadedModel) -> tuple[list[float], list[float]]:
        """One forward over KV_CALIBRATION_TEXT into a full-precision scratch cache (the torch attention, on any
        device: no extra attention kernel to build); each layer's K/V amax over divisors that leave headroom."""
        from tokenizers import Tokenizer

        c, bs = self.model_config, self.block_size
        ids = Tokenizer.from_str(loaded.tokenizer_info.tokenizer_json).encode(KV_CALIBRATION_TEXT).ids
        ids = ids[: self.max_model_len]
        pages = -(-len(ids) // bs)
        attn = TorchPagedAttention(
            self.attn.num_heads, self.num_kv_heads, c.head_dim, self.attn.scale, bs, dtype=self.dtype,
            device=self.device, sliding_window=self._sliding_window(c, self.config),
        )  # fmt: skip
        shape = attn.kv_cache_shape(pages)
        caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.num_hidden_layers)]
        meta = AttentionMetadata.from_batch(
            ForwardBatch([ScheduledSeq("kv-calibration", ids, 0, list(range(pages)), True)]), bs, self.device
        )
        attn.begin_step(meta)
        self.model(to_device_async(ids, torch.int64, self.device), meta.positions, caches, attn)
        k = [max(float(cache[:, 0].abs().max()), 1e-6) / K_SCALE_DIVISOR for cache in caches]
        v = [max(float(cache[:, 1].abs().max()), 1e-6) / V_SCALE_DIVISOR for cache in caches]
        return k, v

    @staticmethod
    def _sliding_window(c, config: EngineConfig) -> int | list[int | None] | None:
        """The model's attention window(s) (one, or one per layer), when a context can outgrow them (else
        windowing changes nothing)."""
        limit = min(config.max_model_len or c.max_position_embeddings, c.max_position_embeddings)
        return c.attention_windows(limit)

    def kv_cache_bytes_per_block(self) -> int:
        """All layers' bytes for one block, from the backend's layout (K and V, or MLA's one latent row)."""
        elem = torch.empty((), dtype=self.kv_dtype).element_size()
        return self.model_config.num_hidden_layers * math.prod(self.attn.kv_cache_shape(1)) * elem

    def available_kv_cache_bytes(self) -> int | None:
        """Bytes the KV pool may take: on CUDA, what gpu_memory_utilization leaves after weights and a
        forward at the token budget; None on CPU (the engine then uses an explicit byte budget)."""
        if self.device.type != "cuda":
            return None
        weights = torch.cuda.memory_allocated(self.device)
        self.profile_run()
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)  # CUDA context, cuBLAS, NCCL...
        peak = torch.cuda.max_memory_allocated(self.device)
        budget = int(total * self.config.gpu_memory_utilization) - used_by_others - peak - self.upproject_reserve_bytes
        if self.use_cuda_graphs:
            budget -= self.kv_cache_bytes_per_block()  # the dummy block
        gib = 2**30
        self.memory_profile = {
            "total_gib": total / gib,
            "weights_gib": weights / gib,
            **{f"weights_{dtype}_gib": n / gib for dtype, n in self.weight_bytes.items()},
            "peak_forward_gib": peak / gib,
            "non_torch_gib": used_by_others / gib,
            "mla_upproject_reserve_gib": self.upproject_reserve_bytes / gib,
            "kv_budget_gib": max(budget, 0) / gib,
        }
        logger.info(
            "memory profile: %.1f GiB total x %.2f; weights %.2f GiB, peak with a %d-token forward %.2f GiB, "
            "outside torch %.2f GiB, MLA up-projection reserve %.2f GiB -> KV cache budget %.2f GiB",
            total / gib, self.config.gpu_memory_utilization, weights / gib, self.config.max_num_batched_tokens,
            peak / gib, used_by_others / gib, self.upproject_reserve_bytes / gib, max(budget, 0) / gib,
        )  # fmt: skip
        return max(budget, 0)

    @torch.inference_mode()
    def profile_run(self) -> None:
        """One forward at the token budget (split over up to max_num_seqs sequences, each sampling, plus one
        softmax-sized temporary for the sampler), so the KV pool is sized from the measured activation peak. MLA
        attends absorbed here (its larger per-token temporaries); the up-projected path's context-sized K/V are
        reserved on top (upproject_reserve_bytes)."""
        c = self.model_config
        bs = self.block_size
        tokens = max(1, min(self.config.max_num_batched_tokens, self.max_model_len))
        n_seqs = max(1, min(self.config.max_num_seqs, tokens))
        lens = [tokens // n_seqs + (1 if i < tokens % n_seqs else 0) for i in range(n_seqs)]
        seqs, next_block = [], 0
        for i, n in enumerate(lens):
            pages = -(-n // bs)
            seqs.append(ScheduledSeq(f"profile-{i}", [0] * n, 0, list(range(next_block, next_block + pages)), True))
            next_block += pages
        # One small cache shared by every layer: the pool itself is what this run sizes.
        cache = torch.zeros(self.attn.kv_cache_shape(next_block), dtype=self.kv_dtype, device=self.device)
        min_tokens = getattr(self.attn, "upproject_min_tokens", 0)
        up = min(max(min_tokens, 2), tokens, self.config.mla_upproject_context_budget)
        if min_tokens and up >= 2:
            # one up-projected chunk builds that path's kernels (flashinfer's JIT) before serving; before the peak
            # reset, so what is measured stays the absorbed forward
            warm = ScheduledSeq("profile-upproject", [0] * up, 0, list(range(-(-up // bs))), True)
            self._forward(ForwardBatch([warm]), [cache] * c.num_hidden_layers)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        with absorbed_only(self.attn):
            logits = self._forward(ForwardBatch(seqs), [cache] * c.num_hidden_layers)
        torch.softmax(logits, dim=-1)
        torch.cuda.synchronize(self.device)
        del cache, logits
        torch.cuda.empty_cache()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """One zeroed tensor per layer in the backend's layout ([num_blocks, 2, block_size, kv_heads, head_dim], or
        MLA's [num_blocks, block_size, latent width]). Zeroed, not empty:
        padded context slots are masked, but NaN garbage in V would still poison a weighted sum."""
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        c = self.model_config
        physical = num_blocks + 1 if self.use_cuda_graphs else num_blocks
        shape = self.attn.kv_cache_shape(physical)
        self._graphs = {}  # graphs captured the old pool's addresses
        self.kv_caches = []  # free the old pool before allocating the new one
        self.kv_caches = [
            torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in range(c.num_hidden_layers)
        ]
        self.num_blocks = num_blocks
        self.dummy_block = num_blocks if self.use_cuda_graphs else -1
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens, %.1f MiB (%d bytes per token; %s layer tensors of %s %s)",
            num_blocks,
            self.block_size,
            num_blocks * self.block_size,
            num_blocks * self.kv_cache_bytes_per_block() / 2**20,
            self.kv_cache_bytes_per_block() // self.block_size,
            c.num_hidden_layers,
            list(shape),
            str(self.kv_dtype).removeprefix("torch."),
        )
        if self.use_cuda_graphs:
            self.capture_cuda_graphs()

    # ---- CUDA graphs for decode ----------------------------------------------------------------
    def _graph_body(self, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        self.attn.set_slots(slots)
        return self.model(ids, pos, self.kv_caches, self.attn)

    @torch.inference_mode()
    def capture_cuda_graphs(self) -> None:
        """Capture the decode forward (without the LM head) once per batch size, largest first so every
        smaller graph reuses the largest one's memory pool. Rows are padded to the captured size."""
        start = time.perf_counter()
        sizes = cuda_graph_batch_sizes(self.config.max_num_seqs)
        max_pages = min(-(-self.max_model_len // self.block_size), self.num_blocks)
        self.attn.init_cuda_graphs(sizes, max_pages)
        self._graph_inputs = torch.zeros((3, sizes[-1]), dtype=torch.int64, device=self.device)  # ids, pos, slots
        self._graph_inputs[2].fill_(self.dummy_block * self.block_size)
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(sizes):
            ids, pos, slots = self._graph_inputs[:, :b]
            self.attn.begin_graph_step(b, [1] * b, [[self.dummy_block]] * b)
            self._graph_body(ids, pos, slots)  # warm-up outside the capture (lazy inits, autotuning)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self._graph_body(ids, pos, slots)
            self._graphs[b] = (graph, hidden)
        torch.cuda.synchronize(self.device)
        self._graph_sizes = sizes
        self.graph_capture_seconds = time.perf_counter() - start
        logger.info(
            "CUDA graphs: captured decode for %d batch sizes (%d..%d) in %.1fs",
            len(sizes), sizes[0], sizes[-1], self.graph_capture_seconds,
        )  # fmt: skip

    def _execute_graph(
        self, batch: ForwardBatch, flat: np.ndarray, n_blocks: np.ndarray, fill: TokenFill | None
    ) -> torch.Tensor | None:
        """Replay the smallest captured decode graph that holds the batch; None when it does not apply.
        `flat`/`n_blocks`: the batch's block tables from `flatten_block_tables`. Host work is numpy over
        those arrays (no Python loop over blocks), one pinned copy of the graph inputs."""
        seqs = batch.seqs
        n = len(seqs)
        if not self._graphs or n > self._graph_sizes[-1] or any(len(s.token_ids) != 1 for s in seqs):
            return None
        b = self._graph_sizes[bisect.bisect_left(self._graph_sizes, n)]
        bs, pad = self.block_size, b - n
        start = np.fromiter((s.start_pos for s in seqs), dtype=np.int64, count=n)
        seq_lens = np.ones(b, dtype=np.int64)
        seq_lens[:n] = start + 1
        if not self.attn.graph_fits(seq_lens):
            return None
        host = np.empty((3, b), dtype=np.int64)
        host[0, :n] = np.fromiter((s.token_ids[0] for s in seqs), dtype=np.int64, count=n)
        np.maximum(host[0, :n], 0, out=host[0, :n])  # placeholders (-1) are filled on the device below
        host[1, :n] = start
        first = np.zeros(n, dtype=np.int64)
        np.cumsum(n_blocks[:-1], out=first[1:])
        host[2, :n] = flat[first + start // bs].astype(np.int64) * bs + start % bs
        host[0, n:] = 0
        host[1, n:] = 0
        host[2, n:] = self.dummy_block * bs
        dev = torch.from_numpy(host)
        if self.device.type == "cuda":
            dev = dev.pin_memory()
        self._graph_inputs[:, :b].copy_(dev, non_blocking=True)
        if fill is not None:
            self._fill_tokens(self._graph_inputs[0], fill.seq_indices, fill)
        if pad:
            flat = np.concatenate([flat, np.full(pad, self.dummy_block, dtype=np.int32)])
            n_blocks = np.concatenate([n_blocks, np.ones(pad, dtype=np.int64)])
        layout = paged_kv_layout_flat(seq_lens, flat, n_blocks, bs)
        self.attn.begin_graph_step_layout(b, *layout)
        graph, hidden = self._graphs[b]
        graph.replay()
        self.graph_replays += 1
        rows = [i for i, s in enumerate(seqs) if s.needs_logits]
        if len(rows) == n:
            return self.model.compute_logits(hidden[:n])
        return self.model.compute_logits(hidden[to_device_async(rows, torch.int64, self.device)])

    def _fill_tokens(self, input_ids: torch.Tensor, positions: list[int], fill: TokenFill) -> None:
        """Write the previous step's sampled ids into `input_ids` at `positions`, in stream order (no host sync)."""
        dst = to_device_async(positions, torch.int64, self.device)
        src = to_device_async(fill.source_rows, torch.int64, self.device)
        input_ids.index_copy_(0, dst, fill.source.index_select(0, src))

    def close(self) -> None:
        """Nothing outlives this runner but its tensors (the StepRunner interface)."""

    def execute(self, batch: ForwardBatch, fill: TokenFill | None, sample: Sample) -> StepResult:
        """Queue the forward and the sampling of its logits (StepRunner)."""
        return sample(self.logits(batch, fill))

    @torch.inference_mode()
    def logits(self, batch: ForwardBatch, fill: TokenFill | None = None) -> torch.Tensor:
        """float32 logits [number of seqs with needs_logits, vocab], in batch order. Nothing here waits for
        the GPU: the logits are queued work. `fill` supplies the tokens still marked PLACEHOLDER."""
        vocab = self.model_config.vocab_size
        if not batch.seqs:
            return torch.empty((0, vocab), dtype=torch.float32, device=self.device)
        if not self.kv_caches:
            raise RuntimeError("allocate_kv_cache() must run before execute()")
        flat, n_blocks = flatten_block_tables([s.block_ids for s in batch.seqs])
        if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= self.num_blocks):
            for seq in batch.seqs:
                bad = [b for b in seq.block_ids if not 0 <= b < self.num_blocks]
                if bad:
                    raise ValueError(
                        f"request {seq.request_id}: block ids {bad[:4]} outside the pool of {self.num_blocks}"
                    )
        if self._graphs:
            logits = self._execute_graph(batch, flat, n_blocks, fill)
            if logits is not None:
                return logits
        return self._forward(batch, self.kv_caches, fill)

    def _forward(
        self, batch: ForwardBatch, kv_caches: list[torch.Tensor], fill: TokenFill | None = None
    ) -> torch.Tensor:
        """The eager path: plan attention for this batch, run the model, project the sampling rows."""
        vocab = self.model_config.vocab_size
        meta = AttentionMetadata.from_batch(batch, self.block_size, self.device)
        host_ids = np.fromiter((t for s in batch.seqs for t in s.token_ids), dtype=np.int64, count=batch.num_tokens)
        np.maximum(host_ids, 0, out=host_ids)  # placeholders (-1) are filled on the device below
        ends = np.cumsum([len(s.token_ids) for s in batch.seqs])
        sample_rows = [int(end) - 1 for end, seq in zip(ends, batch.seqs, strict=True) if seq.needs_logits]
        input_ids = to_device_async(host_ids, torch.int64, self.device)
        if fill is not None:
            self._fill_tokens(input_ids, [int(ends[i]) - 1 for i in fill.seq_indices], fill)
        self.attn.begin_step(meta)
        hidden = self.model(input_ids, meta.positions, kv_caches, self.attn)
        if not sample_rows:
            return torch.empty((0, vocab), dtype=torch.float32, device=self.device)
        rows = to_device_async(sample_rows, torch.int64, self.device)
        return self.model.compute_logits(hidden[rows])
