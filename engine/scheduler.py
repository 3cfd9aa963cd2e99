"""Continuous batching with chunked prefill and preemption by recompute.

Every step shares one token budget (max_num_batched_tokens) between running requests (decodes, and
prefills still in progress) and newly admitted ones, under max_num_seqs. A request is just "tokens known"
vs "tokens computed": a decode is a request one token behind, a prefill chunk a request many behind —
so one loop schedules both. When blocks run out the newest (or lowest-priority) running request is
preempted: its blocks are freed, and it recomputes later, finding its cached prefix again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kubellm.engine.forward_batch import ForwardBatch, ScheduledSeq
from kubellm.engine.kv_cache_manager import KVCacheManager
from kubellm.engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    batch: ForwardBatch = field(default_factory=ForwardBatch)
    requests: list[Request] = field(default_factory=list)  # parallel to batch.seqs
    preempted: list[Request] = field(default_factory=list)
    failed: list[Request] = field(default_factory=list)  # requests that can never fit: finished with an error

    @property
    def is_empty(self) -> bool:
        return not self.batch.seqs


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        policy: str = "fcfs",
        long_prefill_token_threshold: int = 0,
        growth_reserve_tokens: int = 0,
    ):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.policy = policy
        self.long_prefill_token_threshold = long_prefill_token_threshold  # 0: a prefill may take the whole budget
        # New requests are admitted only while the blocks left cover the running ones' next tokens (up to this
        # many each, never past max_tokens): admitting into the last free blocks only to preempt, and recompute,
        # a request a few steps later wastes a whole prefill. 0: admit while blocks last.
        self.growth_reserve_tokens = growth_reserve_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # ---- queue management --------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        if self.policy == "priority":
            # Stable insert: lower priority value first, then arrival order.
            idx = len(self.waiting)
            for i, r in enumerate(self.waiting):
                if (request.priority, request.arrival_time) < (r.priority, r.arrival_time):
                    idx = i
                    break
            self.waiting.insert(idx, request)
        else:
            self.waiting.append(request)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Finish (stop, length, abort, error) and free its blocks at once."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass
        request.status = status
        self.kv.free(request)
        return request

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- one step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled: set[str] = set()

        # 1. Running requests first: decodes and unfinished prefill chunks.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = self._num_new_tokens(req, budget)
            if num_new <= 0:
                i += 1
                continue
            left_running = False
            while not self.kv.allocate(req, num_new):
                victim = self._pick_victim()
                if victim is req or victim is None:
                    if len(self.running) == 1 or victim is None:
                        self._fail(req, out, "the KV cache pool is too small for this request")
                    else:
                        self._preempt(req, out)
                    left_running = True
                    break
                if self.running.index(victim) < i:
                    i -= 1
                budget += self._preempt(victim, out)
            if left_running:
                continue  # req left self.running at index i
            self._add_to_batch(out, req, num_new)
            scheduled.add(req.request_id)
            budget -= num_new
            i += 1

        # 2. Admit waiting requests while budget, seats and blocks last (not after preempting this step).
        reserve = self._growth_reserve_blocks()
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            req = self.waiting[0]
            first_time = req.num_computed_tokens == 0
            cached = self.kv.find_cached_prefix(req) if first_time else []
            num_cached = len(cached) * self.kv.block_size
            if self.kv.blocks_needed(req.num_tokens + 1) > self.kv.num_blocks:
                self.waiting.popleft()
                self._fail(req, out, "the prompt needs more KV cache blocks than the whole pool holds")
                continue
            req.num_computed_tokens = num_cached
            num_new = self._num_new_tokens(req, budget)
            over_reserve = (  # the blocks left after this request would not cover the running ones' growth
                reserve > 0
                and bool(self.running)
                and self.kv.num_free_blocks - self._growth_blocks(req, num_new) < reserve
            )
            if over_reserve or num_new <= 0 or not self.kv.allocate(req, num_new, cached):
                req.num_computed_tokens = 0 if first_time else req.num_computed_tokens
                break
            self.waiting.popleft()
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_cached
                self.kv.record_lookup(req.num_prompt_tokens, num_cached)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._add_to_batch(out, req, num_new)
            budget -= num_new
            if self.growth_reserve_tokens:
                reserve += self._growth_blocks(req, 0)
        return out

    def update_after_step(self, out: SchedulerOutput) -> list[Request]:
        """Advance computed counts; return the requests whose step produced a sampled token."""
        sampled: list[Request] = []
        for req, seq in zip(out.requests, out.batch.seqs, strict=True):
            if req.status != RequestStatus.RUNNING:
                continue
            req.num_computed_tokens = seq.end_pos
            self.kv.commit_computed(req)
            if seq.needs_logits:
                sampled.append(req)
        return sampled

    # ---- helpers -----------------------------------------------------------------------------
    def _growth_blocks(self, req: Request, num_new: int) -> int:
        """Blocks `req` still needs for its scheduled tokens plus its next growth_reserve_tokens outputs."""
        future = min(self.growth_reserve_tokens, max(0, req.max_tokens - len(req.output_token_ids)))
        if req.num_computed_tokens + num_new < req.num_tokens:  # a prefill: it needs its whole prompt first
            future += req.num_tokens - req.num_computed_tokens - num_new
        have = len(self.kv.block_ids(req.request_id))
        return max(0, self.kv.blocks_needed(req.num_computed_tokens + num_new + future) - have)

    def _growth_reserve_blocks(self) -> int:
        if not self.growth_reserve_tokens:
            return 0
        return sum(self._growth_blocks(r, 0) for r in self.running)

    def _num_new_tokens(self, req: Request, budget: int) -> int:
        if req.awaiting_final:
            return 0
        n = req.num_tokens - req.num_computed_tokens
        if self.long_prefill_token_threshold > 0:
            n = min(n, self.long_prefill_token_threshold)
        return min(n, budget)

    def _add_to_batch(self, out: SchedulerOutput, req: Request, num_new: int) -> None:
        start = req.num_computed_tokens
        end = start + num_new
        out.requests.append(req)
        out.batch.seqs.append(
            ScheduledSeq(
                request_id=req.request_id,
                token_ids=req.token_slice(start, end),
                start_pos=start,
                block_ids=self.kv.block_ids(req.request_id),
                needs_logits=end == req.num_tokens,
            )
        )

    def _pick_victim(self) -> Request | None:
        if not self.running:
            return None
        if self.policy == "priority":
            return max(self.running, key=lambda r: (r.priority, r.arrival_time))
        return self.running[-1]

    def _preempt(self, req: Request, out: SchedulerOutput) -> int:
        """Send a running request back to wait; returns the tokens it gave back to this step's budget."""
        self.running.remove(req)
        freed_tokens = self._drop_from_batch(out, req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        out.preempted.append(req)
        return freed_tokens

    def _fail(self, req: Request, out: SchedulerOutput, message: str) -> None:
        if req in self.running:
            self.running.remove(req)
        self._drop_from_batch(out, req)
        self.kv.free(req)
        self.requests.pop(req.request_id, None)
        req.status = RequestStatus.FINISHED_ERROR
        req.error = message
        out.failed.append(req)

    @staticmethod
    def _drop_from_batch(out: SchedulerOutput, req: Request) -> int:
        for j, r in enumerate(out.requests):
            if r is req:
                del out.requests[j]
                return len(out.batch.seqs.pop(j).token_ids)
        return 0
