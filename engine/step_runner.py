"""The seam between the engine loop and whatever runs the model: one typed interface for the CUDA/CPU model
runner, the tensor-parallel runner and the simulated runner, so the loop has no per-runner branches.

A step is `execute(batch, fill, sample)`: the runner runs the batch's forward and hands the logits of the rows
that sample to `sample` (the engine's sampler over the requests' sampling states), returning the pending draw.
A runner that needs the draws itself (tensor parallel: the workers fill the next step's placeholder tokens)
takes them from that result; the simulated runner has no logits and returns ready-made tokens instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from kubellm.engine.forward_batch import ForwardBatch, TokenFill
from kubellm.engine.sampler import SamplerOutput


class StepResult(Protocol):
    """A launched step's sampled tokens: on the device for the next step's inputs, and on the host later."""

    @property
    def token_ids(self) -> torch.Tensor | None:
        """The sampled ids still on the device (None: the runner has no device tensor, e.g. simulated)."""
        ...

    def result(self) -> SamplerOutput:
        """Wait for the draws to reach the host."""
        ...


Sample = Callable[[torch.Tensor], StepResult]  # logits [rows that sample, vocab] -> their draws


@dataclass
class ReadyTokens:
    """A StepResult whose tokens are already known on the host (the simulated runner; an empty step)."""

    tokens: list[int]

    @property
    def token_ids(self) -> torch.Tensor | None:
        return None

    def result(self) -> SamplerOutput:
        return SamplerOutput(token_ids=list(self.tokens), logprobs=[None] * len(self.tokens))


@runtime_checkable
class StepRunner(Protocol):
    """What `LLMEngine` needs of a model runner."""

    @property
    def device(self) -> torch.device: ...

    @property
    def samples_logits(self) -> bool:
        """Its tokens are drawn by `sample` from the model's logits (False: the runner makes them up, like the
        simulated one, so no grammar constrains them)."""
        ...

    @property
    def supports_token_fill(self) -> bool:
        """execute() can take placeholder tokens from the previous step's sampled ids on the device (async
        scheduling needs it)."""
        ...

    def kv_cache_bytes_per_block(self) -> int: ...

    def available_kv_cache_bytes(self) -> int | None:
        """The KV pool's byte budget measured on the device; None: the engine's explicit or CPU default."""
        ...

    def allocate_kv_cache(self, num_blocks: int) -> None: ...

    def execute(self, batch: ForwardBatch, fill: TokenFill | None, sample: Sample) -> StepResult:
        """Queue the batch's forward and its sampling; nothing here waits for the device."""
        ...

    def close(self) -> None:
        """Release what outlives the object otherwise (tensor-parallel worker processes); idempotent."""
        ...
