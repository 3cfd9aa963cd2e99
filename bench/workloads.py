"""The offline workloads, their prompts and the settings every engine under test gets, defined once.

Both engines (ours in bench/offline.py, vLLM in bench/peer_vllm.py, each in its own process) build their prompts from
these seeds and run them with these sampling parameters and engine limits, so a ratio compares engines, not settings.
Stdlib only: the vLLM process imports it beside vLLM's pinned packages.

All requests of a workload arrive at once; prompts are random token ids; outputs run to max_tokens (ignore_eos).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

# Batch-1 decode: one request of BATCH1_PROMPT tokens, timed to 1 and to 1 + BATCH1_OUT output tokens; the difference
# over BATCH1_OUT is ms/token, the same method for every engine (no engine-internal step timer needed).
BATCH1_PROMPT = 1024
BATCH1_OUT = 256


@dataclass(frozen=True)
class Workload:
    key: str
    requests: int
    prompt_len: int
    max_tokens: int
    seed: int
    shared_prefix_len: int = 0  # (c): prompts are one of requests/suffixes_per_prefix prefixes + a unique suffix
    suffixes_per_prefix: int = 1

    def scaled(self, scale: float) -> Workload:
        group = self.suffixes_per_prefix
        n = max(group, round(self.requests * scale / group) * group)
        return Workload(**{**asdict(self), "requests": n})

    def prompts(self, vocab_size: int) -> list[list[int]]:
        """The workload's prompts as token ids, the same for every engine and process (seeded)."""
        rng = random.Random(self.seed)
        if not self.shared_prefix_len:
            return [_tokens(rng, self.prompt_len, vocab_size) for _ in range(self.requests)]
        n_prefix = self.requests // self.suffixes_per_prefix
        prefixes = [_tokens(rng, self.shared_prefix_len, vocab_size) for _ in range(n_prefix)]
        suffix_len = self.prompt_len - self.shared_prefix_len
        prompts = [
            prefixes[i // self.suffixes_per_prefix] + _tokens(rng, suffix_len, vocab_size) for i in range(self.requests)
        ]
        rng.shuffle(prompts)
        return prompts


def _tokens(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    # Away from both ends of the vocabulary, where real tokenizers keep special and control tokens.
    return [rng.randrange(1000, vocab_size - 1000) for _ in range(n)]


WORKLOADS: dict[str, Workload] = {
    "a": Workload("a", requests=1000, prompt_len=1024, max_tokens=128, seed=1),
    "b": Workload("b", requests=500, prompt_len=200, max_tokens=1000, seed=2),
    "c": Workload(
        "c", requests=1000, prompt_len=1600, max_tokens=100, seed=3, shared_prefix_len=1500, suffixes_per_prefix=10
    ),
}


# --profile: the decode batches profiled (of those bench/offline.py's (d) runs) at PROBE_CTX-token prompts, and one
# prefill step of max_num_batched_tokens tokens of PROBE_CTX-token prompts; the same probes for both engines.
PROFILE_BATCHES = (1, 256)
PROBE_CTX = 1024


def decode_probe(batch: int, ctx: int = PROBE_CTX) -> Workload:
    """The prompts of a decode-step probe of `batch` sequences (bench/offline.py's (d), and --profile's)."""
    return Workload(f"d{batch}", batch, ctx, 1, seed=100 + batch)


def prefill_probe(tokens: int, prompt_len: int, round_: int) -> Workload:
    """The prompts of a prefill-step probe of `tokens` tokens (whole `prompt_len`-token prompts); each round its own,
    so none hits the prefix cache."""
    return Workload("prefill-probe", -(-tokens // prompt_len), prompt_len, 1, seed=1000 * tokens + round_)


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters of every benchmark request (the engine-wide seed is in EngineSettings)."""

    temperature: float = 1.0
    top_p: float = 1.0
    ignore_eos: bool = True


@dataclass(frozen=True)
class EngineSettings:
    """Limits both engines run under. gpu_memory_utilization is the fraction of the GPU's memory each may use."""

    max_num_seqs: int = 1024
    max_num_batched_tokens: int = 16384
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    block_size: int = 16
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    seed: int = 0
    tensor_parallel_size: int = 1
    # None: bf16 weights; "fp8": online per-tensor FP8 (both engines' --quantization fp8); "fp8-block": the fp8
    # checkpoint format with 128x128 block scales (bench/fp8_checkpoint.py)
    quantization: str | None = None
    kv_cache_dtype: str = "auto"  # or "fp8" (both engines' --kv-cache-dtype)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
