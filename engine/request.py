"""One sequence's state as the scheduler and KV cache manager see it: token ids and counts, no tensors."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kubellm.block_hash import hash_blocks

if TYPE_CHECKING:
    from kubellm.engine.sampling_params import SamplingParams

# An output token sampled on the device whose value the host has not read back yet (async scheduling): the
# model runner fills it from the previous step's sampled tensor. Only ever the request's last token.
PLACEHOLDER = -1


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in the waiting queue; its KV is recomputed (cached prefix blocks reused)
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    is_finished: bool  # a FINISHED_* status: a plain attribute of each member (set below), read per row each step


for _status in RequestStatus:  # (a property would cost two Python calls a read: its own and Enum.__hash__)
    _status.is_finished = _status.name.startswith("FINISHED")


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: never past max_model_len
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.time)
    priority: int = 0
    cache_salt: str = ""
    block_size: int = 16
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = -1  # prefix-cache hit on first scheduling (-1: not yet scheduled)
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    error: str | None = None
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of the full blocks of all tokens
    num_preemptions: int = 0
    num_pending: int = 0  # trailing output tokens still PLACEHOLDER (async scheduling: at most 2)
    awaiting_final: bool = False  # its last token is in flight and reaches max_tokens: schedule no more

    @property
    def num_resolved_tokens(self) -> int:
        """Tokens whose values the host knows (the pending ones are still on the device)."""
        return self.num_tokens - self.num_pending

    @property
    def num_resolved_outputs(self) -> int:
        return len(self.output_token_ids) - self.num_pending

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    def update_block_hashes(self) -> None:
        """Extend the chained hashes to cover every full block of the tokens known so far."""
        num_full = self.num_resolved_tokens // self.block_size
        if num_full > len(self.block_hashes):
            start = len(self.block_hashes)
            parent = self.block_hashes[-1] if self.block_hashes else None
            tokens = self.token_slice(start * self.block_size, num_full * self.block_size)
            self.block_hashes.extend(hash_blocks(tokens, self.block_size, self.cache_salt, parent=parent))

    def append_placeholder(self) -> None:
        """A token was sampled on the device this step; its value arrives with `resolve_placeholder`."""
        self.output_token_ids.append(PLACEHOLDER)
        self.num_pending += 1

    def resolve_placeholder(self, token_id: int) -> bool:
        """Fill the oldest pending token; True when that completed a block (new block hashes exist)."""
        index = len(self.output_token_ids) - self.num_pending
        self.output_token_ids[index] = token_id
        self.num_pending -= 1
        if self.num_resolved_tokens % self.block_size == 0:
            self.update_block_hashes()
            return True
        return False

    def drop_pending(self) -> None:
        """Forget tokens still in flight (the request finished before they were read back)."""
        if self.num_pending:
            del self.output_token_ids[-self.num_pending :]
            self.num_pending = 0
