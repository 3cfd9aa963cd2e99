"""`ModelRunner`: owns the weights and the paged KV cache on the device; turns a ForwardBatch into logits.

The scheduler never sees a tensor: it hands over token ids, positions and block tables (ForwardBatch), and
gets back float32 logits for the sequences that sample this step, in batch order.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from kubellm.engine.attention import AttentionBackend, AttentionMetadata, kv_cache_shape, select_backend_class
from kubellm.engine.config import EngineConfig
from kubellm.engine.forward_batch import ForwardBatch
from kubellm.engine.loader import LoadedModel, parse_dtype
from kubellm.engine.models import build_model

logger = logging.getLogger(__name__)


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


def configure_cpu_threads() -> int:
    """One intra-op thread per usable CPU (KUBELLM_NUM_THREADS overrides): torch's default counts the host's
    cores, which oversubscribes a CPU-limited pod and slows every matmul."""
    wanted = int(os.environ.get("KUBELLM_NUM_THREADS", "0")) or available_cpus()
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    return wanted


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
    produces_token_ids = False  # it returns logits; the engine samples

    def __init__(self, loaded: LoadedModel, config: EngineConfig):
        self.config = config
        self.model_config = loaded.config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if self.device.type == "cpu":
            configure_cpu_threads()
        self.block_size = config.block_size
        self.model = build_model(loaded.config, self.dtype, self.device)
        self.model.load_weights(loaded.weights)
        self.model.eval()
        c = loaded.config
        backend_cls = select_backend_class(config.attention_backend, self.device)
        self.attn: AttentionBackend = backend_cls(
            c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.head_dim**-0.5, config.block_size
        )
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0

    def kv_cache_bytes_per_block(self) -> int:
        c = self.model_config
        elem = torch.empty((), dtype=self.dtype).element_size()
        return c.num_hidden_layers * 2 * self.block_size * c.num_key_value_heads * c.head_dim * elem

    def available_kv_cache_bytes(self) -> int | None:
        """Bytes the KV pool may take: on CUDA, what gpu_memory_utilization leaves after weights and a
        forward at the token budget; None on CPU (the engine then uses an explicit byte budget)."""
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        budget = int(total * self.config.gpu_memory_utilization) - used_by_others - peak
        return max(budget, 0)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """One zeroed tensor per layer, [num_blocks, 2, block_size, kv_heads, head_dim]. Zeroed, not empty:
        padded context slots are masked, but NaN garbage in V would still poison a weighted sum."""
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        c = self.model_config
        shape = kv_cache_shape(num_blocks, self.block_size, c.num_key_value_heads, c.head_dim)
        self.kv_caches = []  # free the old pool before allocating the new one
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.num_hidden_layers)]
        self.num_blocks = num_blocks
        logger.info(
            "KV cache: %d blocks of %d tokens, %.1f MiB",
            num_blocks,
            self.block_size,
            num_blocks * self.kv_cache_bytes_per_block() / 2**20,
        )

    @torch.inference_mode()
    def execute(self, batch: ForwardBatch) -> torch.Tensor:
        """float32 logits [number of seqs with needs_logits, vocab], in batch order."""
        vocab = self.model_config.vocab_size
        if not batch.seqs:
            return torch.empty((0, vocab), dtype=torch.float32, device=self.device)
        if not self.kv_caches:
            raise RuntimeError("allocate_kv_cache() must run before execute()")
        for seq in batch.seqs:
            bad = [b for b in seq.block_ids if not 0 <= b < self.num_blocks]
            if bad:
                raise ValueError(f"request {seq.request_id}: block ids {bad[:4]} outside the pool of {self.num_blocks}")
        meta = AttentionMetadata.from_batch(batch, self.block_size, self.device)
        input_ids = torch.tensor([t for s in batch.seqs for t in s.token_ids], dtype=torch.int64)
        sample_rows, end = [], 0
        for seq in batch.seqs:
            end += len(seq.token_ids)
            if seq.needs_logits:
                sample_rows.append(end - 1)
        self.attn.begin_step(meta)
        hidden = self.model(input_ids.to(self.device, non_blocking=True), meta.positions, self.kv_caches, self.attn)
        if not sample_rows:
            return torch.empty((0, vocab), dtype=torch.float32, device=self.device)
        rows = torch.tensor(sample_rows, dtype=torch.int64, device=self.device)
        return self.model.compute_logits(hidden[rows])
