"""What the scheduler hands the model runner each step: pure Python, no tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ScheduledSeq:
    request_id: str
    token_ids: list[int]  # the tokens computed this step (a prefill chunk, or one decode token)
    start_pos: int  # tokens of this request already in the KV cache
    block_ids: list[int]  # the request's whole block table, covering start_pos + len(token_ids) tokens
    needs_logits: bool  # this step reaches the request's last known token: a token is sampled

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass
class ForwardBatch:
    seqs: list[ScheduledSeq] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    @property
    def is_decode_only(self) -> bool:
        return all(len(s.token_ids) == 1 and s.needs_logits for s in self.seqs)


@dataclass
class TokenFill:
    """Async scheduling: sequences of this batch whose last token is a PLACEHOLDER take it from the previous
    step's sampled ids, still on the device (`source`, a tensor: this module stays free of torch)."""

    source: Any  # int64 tensor [rows sampled by the previous step]
    seq_indices: list[int]  # batch positions of the sequences ending in a placeholder
    source_rows: list[int]  # the row of `source` holding each one's token
