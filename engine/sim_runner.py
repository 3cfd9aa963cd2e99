"""`--device sim`: the real engine (scheduler, KV cache manager, prefix cache, server, metrics, KV events)
with the model's compute replaced by a timing model and placeholder tokens.

It lets tests and benchmarks run many replicas on a CPU. Only this runner is simulated; everything that
decides what runs when is the production code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kubellm.engine.config import EngineConfig
from kubellm.engine.forward_batch import ForwardBatch, TokenFill
from kubellm.engine.step_runner import ReadyTokens, Sample
from kubellm.prompt import PromptRenderer

PLACEHOLDER_TEXT = " lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor"


@dataclass
class SimTiming:
    """Seconds per step as a function of its work. Defaults approximate a Llama-3.1-8B-shaped model on
    one H200 (prefill ~40k tokens/s; a decode step ~7 ms plus ~40 us per sequence)."""

    step_overhead_s: float = 0.002
    prefill_s_per_token: float = 25e-6
    decode_s_per_seq: float = 40e-6
    decode_base_s: float = 0.005
    kv_bytes_per_token: int = 131072  # Llama-3.1-8B in bf16: 32 layers x 8 KV heads x 128 x 2 x 2 bytes
    kv_budget_bytes: int = 16 * 1024**3
    time_scale: float = 1.0  # >1: a slower simulated device, e.g. so a CPU-bound load generator can load it

    def step_seconds(self, batch: ForwardBatch) -> float:
        prefill_tokens = sum(len(s.token_ids) for s in batch.seqs if len(s.token_ids) > 1)
        decodes = sum(1 for s in batch.seqs if len(s.token_ids) == 1)
        t = self.step_overhead_s + prefill_tokens * self.prefill_s_per_token
        if decodes:
            t += self.decode_base_s + decodes * self.decode_s_per_seq
        return t * self.time_scale


def load_sim_model(path: str):
    """The model's config, tokenizer and chat template, without its weights."""
    from kubellm.engine.loader import load_model

    return load_model(path, dtype="auto", load_weights=False)


class SimModelRunner:
    """A StepRunner whose steps sleep for their modelled time and produce placeholder tokens (no logits)."""

    samples_logits = False  # placeholder text's tokens, no logits
    supports_token_fill = False  # its tokens are known at once: the engine steps synchronously
    device = torch.device("cpu")

    def __init__(self, loaded, config: EngineConfig, timing: SimTiming | None = None):
        self.config = config
        self.timing = timing or SimTiming(time_scale=config.sim_time_scale)
        renderer = PromptRenderer(loaded.tokenizer_info)
        self.placeholder_ids = renderer.encode(PLACEHOLDER_TEXT, add_special_tokens=False) or [0]
        self.num_blocks = 0

    def kv_cache_bytes_per_block(self) -> int:
        return self.timing.kv_bytes_per_token * self.config.block_size

    def available_kv_cache_bytes(self) -> int:
        return self.timing.kv_budget_bytes

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks

    def execute(self, batch: ForwardBatch, fill: TokenFill | None, sample: Sample) -> ReadyTokens:
        """Sleep for the step's modelled time; the sampling rows get placeholder text's tokens (`sample`,
        the engine's sampler, has no logits to work on here)."""
        del fill, sample
        time.sleep(self.timing.step_seconds(batch))
        ids = self.placeholder_ids
        return ReadyTokens([ids[s.end_pos % len(ids)] for s in batch.seqs if s.needs_logits])

    def close(self) -> None:
        """Nothing to release."""
