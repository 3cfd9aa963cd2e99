"""What the engine returns per request, shaped like vLLM's RequestOutput so users find what they know.

While streaming, the engine returns deltas (vLLM's DELTA output kind): each output carries only the text,
token ids and logprobs that are new since the request's previous output, so the step thread never copies a
request's whole history. `RequestOutput.add` assembles deltas into the whole output where one is needed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class OutputKind(enum.Enum):
    DELTA = "delta"  # every step: what is new for each request that got a token
    FINAL_ONLY = "final_only"  # one output per request, when it finishes, holding everything


@dataclass
class EngineStats:
    """A snapshot of the engine's load and counters, for metrics and the server's admission control."""

    num_running: int
    num_waiting: int
    kv_usage: float  # 0-1
    blocks_used: int
    blocks_total: int
    prefix_queries: int  # cumulative, tokens
    prefix_hits: int  # cumulative, tokens
    num_preemptions: int  # cumulative
    prompt_tokens: int  # cumulative
    generation_tokens: int  # cumulative


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1-based rank of the token in the distribution
    decoded_token: str | None = None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    error: str | None = None
    metrics: RequestMetrics | None = None

    def add(self, delta: RequestOutput) -> None:
        """Append a later delta of the same request (its completions matched by index); the newer state wins."""
        by_index = {c.index: c for c in self.outputs}
        for new in delta.outputs:
            mine = by_index.get(new.index)
            if mine is None:
                mine = CompletionOutput(new.index, logprobs=[] if new.logprobs is not None else None)
                self.outputs.append(mine)
                by_index[new.index] = mine
            mine.text += new.text
            mine.token_ids.extend(new.token_ids)
            if new.logprobs is not None:
                if mine.logprobs is None:
                    mine.logprobs = []
                mine.logprobs.extend(new.logprobs)
            mine.cumulative_logprob = new.cumulative_logprob
            mine.finish_reason = new.finish_reason
            mine.stop_reason = new.stop_reason
        self.outputs.sort(key=lambda c: c.index)
        self.finished = delta.finished
        self.num_cached_tokens = delta.num_cached_tokens
        self.error = delta.error
        self.metrics = delta.metrics


class OutputAssembler:
    """Whole outputs from a stream of deltas of many requests (for callers of `LLMEngine.step` that want them)."""

    def __init__(self) -> None:
        self._whole: dict[str, RequestOutput] = {}

    def add(self, delta: RequestOutput) -> RequestOutput:
        """Fold in one delta; returns its request's whole output so far (forgotten once it is finished)."""
        whole = self._whole.get(delta.request_id)
        if whole is None:
            whole = delta
        else:
            whole.add(delta)
        if whole.finished:
            self._whole.pop(delta.request_id, None)
        else:
            self._whole[delta.request_id] = whole
        return whole
