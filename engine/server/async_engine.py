"""The async engine loop: one dedicated thread owns the (single-threaded) LLMEngine; the aiohttp event loop
never blocks on it.

The loop thread talks to the engine thread only through a thread-safe command queue (add, abort, KV
subscribe); the engine thread applies commands between steps, runs `engine.step()`, and hands everything a
step produced (request outputs, numbered KV events, a stats snapshot) back to the event loop in one
`call_soon_threadsafe` batch, so their order is preserved. KV snapshots are taken on the engine thread
between steps, which makes "snapshot at seq N, then events N+1, N+2, ..." exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from kubellm.block_hash import to_hex
from kubellm.engine.outputs import EngineStats, RequestOutput
from kubellm.engine.sampling_params import SamplingParams
from kubellm.kv_events import (
    LOAD_MIN_INTERVAL_S,
    AllBlocksClearedEvent,
    BlockRemovedEvent,
    BlockStoredEvent,
    LoadEvent,
    SnapshotEvent,
    encode_event,
)
from kubellm.openai_errors import APIError

from .served_engine import ServedEngine

logger = logging.getLogger("kubellm.engine.server")

IDLE_WAIT_S = 0.5
KV_SUBSCRIBER_MAX_BACKLOG = 10_000  # lines; a consumer that falls further behind is cut off and resyncs


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    arrival_time: float
    priority: int
    stream: RequestStream
    cache_salt: str | None = None


@dataclass
class _Abort:
    request_id: str


@dataclass
class _AbortAll:
    pass


@dataclass
class _Subscribe:
    sub: KVSubscription


class Aborted:
    """Final item of a stream whose request was aborted (client gone, or shutdown grace period over)."""


_END = object()


class RequestStream:
    """What one request's handler reads: delta RequestOutputs (each carries what is new), in order; deltas
    that queued up while the handler was slower than the engine are merged into one."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.finished = False
        self.aborted = False

    async def updates(self) -> AsyncIterator[Any]:
        """Yields RequestOutputs until the finished one; raises APIError for a request the engine refused;
        ends early (with `aborted` set) when the request was aborted."""
        while not self.finished:
            item = await self.queue.get()
            while not self.queue.empty() and not _is_terminal(item):
                newer = self.queue.get_nowait()
                if isinstance(newer, (BaseException, Aborted)):
                    item = newer
                else:
                    item.add(newer)
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            if isinstance(item, Aborted):
                self.finished = self.aborted = True
                return
            if item.finished:
                self.finished = True
            yield item


def _is_terminal(item: Any) -> bool:
    return isinstance(item, (BaseException, Aborted)) or bool(getattr(item, "finished", False))


@dataclass(eq=False)
class KVSubscription:
    """One /v1/kv_events consumer: encoded NDJSON lines, the snapshot first."""

    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    closed: bool = False

    async def lines(self) -> AsyncIterator[bytes]:
        while True:
            item = await self.queue.get()
            if item is _END:
                return
            yield item


class AsyncEngine:
    """Runs an LLMEngine on its own thread and exposes it to asyncio code."""

    def __init__(
        self,
        engine_factory: Callable[[], ServedEngine],
        *,
        max_waiting_requests: int | None = None,
        on_output: Callable[[RequestOutput], None] | None = None,
        on_abort: Callable[[str], None] | None = None,
        on_step: Callable[[int], None] | None = None,
    ):
        self._factory = engine_factory
        self.max_waiting_requests = max_waiting_requests
        self._on_output = on_output
        self._on_abort = on_abort
        self._on_step = on_step  # tokens scheduled by each engine step (metrics)
        self._engine: ServedEngine | None = None
        self.epoch = uuid.uuid4().hex[:16]
        self.stats: EngineStats | None = None
        self.dead: BaseException | None = None
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._pending_adds = 0  # loop thread only: adds queued that the last stats snapshot does not count
        self._active: dict[str, RequestStream] = {}  # loop thread: requests in flight
        # engine thread only:
        self._sinks: dict[str, RequestStream] = {}
        self._subscribers: list[KVSubscription] = []
        self._seq = 0
        self._load_sent: tuple[int, int, int] | None = None  # the last load line's (running, waiting, free_blocks)
        self._load_sent_at = float("-inf")

    # ---- lifecycle (event loop thread) ----

    async def start(self) -> None:
        """Builds the engine on its thread (model load takes seconds) and returns once it is ready."""
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="kubellm-engine", daemon=True)
        self._thread.start()
        await ready

    async def shutdown(self) -> None:
        self._stop.set()
        self._commands.put(None)
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30)

    @property
    def engine(self) -> ServedEngine:
        """The engine (once `start()` has returned)."""
        if self._engine is None:
            raise RuntimeError("the engine has not started")
        return self._engine

    @property
    def ready(self) -> bool:
        return self._engine is not None and self.dead is None and not self._stop.is_set()

    @property
    def num_in_flight(self) -> int:
        return len(self._active)

    def waiting_estimate(self) -> int:
        waiting = self.stats.num_waiting if self.stats is not None else 0
        return waiting + self._pending_adds

    def queue_full(self) -> bool:
        limit = self.max_waiting_requests
        return limit is not None and self.waiting_estimate() >= limit

    # ---- requests (event loop thread) ----

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        prompt: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> RequestStream:
        if self.dead is not None:
            raise APIError(503, "the engine has failed; this replica is restarting", code="engine_dead")
        if request_id in self._active:
            raise APIError(400, f"request id {request_id!r} is already in flight", param="request_id")
        stream = RequestStream(request_id)
        self._active[request_id] = stream
        self._pending_adds += 1
        add = _Add(request_id, prompt_token_ids, params, prompt, time.time(), priority, stream, cache_salt)
        self._commands.put(add)
        return stream

    def abort(self, request_id: str) -> None:
        """Frees the request's KV blocks at once (next engine-thread iteration); idempotent."""
        stream = self._active.pop(request_id, None)
        if stream is not None and not stream.finished:
            self._commands.put(_Abort(request_id))

    def abort_all(self) -> None:
        self._commands.put(_AbortAll())

    def release(self, request_id: str) -> None:
        """Called when a handler is done with a stream (finished or not)."""
        self.abort(request_id)

    async def subscribe_kv_events(self) -> KVSubscription:
        sub = KVSubscription(queue=asyncio.Queue())
        self._commands.put(_Subscribe(sub))
        return sub

    def unsubscribe_kv_events(self, sub: KVSubscription) -> None:
        sub.closed = True

    # ---- engine thread ----

    def _run(self, ready: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            self._engine = self._factory()
            self.stats = self._engine.stats()
        except BaseException as e:  # surfaced to start()'s caller
            logger.exception("engine failed to start")
            loop.call_soon_threadsafe(_set_exception, ready, e)
            return
        loop.call_soon_threadsafe(_set_result, ready)
        try:
            while not self._stop.is_set():
                self._iteration()
        except BaseException as e:
            logger.exception("engine loop failed; failing in-flight requests")
            self.dead = e
            batch = [
                (s, APIError(500, f"engine failure: {type(e).__name__}", code="engine_dead"))
                for s in self._sinks.values()
            ]
            self._sinks.clear()
            ends = [(sub, _END) for sub in self._subscribers]
            self._post(batch + ends, None, 0)
        finally:
            with contextlib.suppress(Exception):  # tensor-parallel workers go with the engine thread
                self.engine.close()

    def _iteration(self) -> None:
        engine = self.engine
        commands: list[Any] = []
        if not engine.has_unfinished_requests():
            try:
                commands.append(self._commands.get(timeout=self._idle_wait()))
            except queue.Empty:
                idle: list[tuple[Any, Any]] = []
                self._publish_load(idle, engine.stats())  # a change held back by the rate limit goes out now
                if idle:
                    self._post(idle, None, 0)
                return
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                break
        batch: list[tuple[Any, Any]] = []
        added = 0
        for cmd in commands:
            if isinstance(cmd, _Add):
                added += 1
                self._apply_add(cmd, batch)
            elif isinstance(cmd, _Abort):
                self._apply_abort(cmd.request_id, batch)
            elif isinstance(cmd, _AbortAll):
                for rid in list(self._sinks):
                    self._apply_abort(rid, batch)
            elif isinstance(cmd, _Subscribe):
                self._publish_kv_events(batch)
                self._apply_subscribe(cmd.sub, batch)
        if engine.has_unfinished_requests():
            outputs = engine.step()
            self._observe_step(engine.last_step_tokens)
            for out in outputs:
                stream = self._sinks.get(out.request_id)
                self._observe(out)
                if stream is None:
                    continue
                if out.finished:
                    del self._sinks[out.request_id]
                if out.error:
                    batch.append((stream, APIError(400, str(out.error))))
                else:
                    batch.append((stream, out))  # a delta: fresh lists the engine thread never touches again
        self._publish_kv_events(batch)
        stats = engine.stats()
        self._publish_load(batch, stats)
        self._post(batch, stats, added)

    def _observe_step(self, num_tokens: int) -> None:
        if self._on_step is None:
            return
        try:
            self._on_step(num_tokens)
        except Exception:
            logger.exception("metrics hook failed for an engine step")

    def _observe(self, out: RequestOutput) -> None:
        """Metrics hook; observability must never take the engine down."""
        if self._on_output is None:
            return
        try:
            self._on_output(out)
        except Exception:
            logger.exception("metrics hook failed for request %s", out.request_id)

    def _apply_add(self, cmd: _Add, batch: list[tuple[Any, Any]]) -> None:
        try:
            self.engine.add_request(
                cmd.request_id,
                cmd.prompt_token_ids,
                cmd.params,
                prompt=cmd.prompt,
                arrival_time=cmd.arrival_time,
                priority=cmd.priority,
                cache_salt=cmd.cache_salt or "",
            )
        except ValueError as e:
            batch.append((cmd.stream, APIError(400, str(e))))
            return
        self._sinks[cmd.request_id] = cmd.stream

    def _apply_abort(self, request_id: str, batch: list[tuple[Any, Any]]) -> None:
        stream = self._sinks.pop(request_id, None)
        if stream is None:
            return
        try:
            finals = self.engine.abort_request(request_id) or []
        except (KeyError, ValueError):
            finals = []
        final = next((o for o in finals if o.request_id == request_id), None)
        if final is None:
            if self._on_abort is not None:
                with contextlib.suppress(Exception):
                    self._on_abort(request_id)
            batch.append((stream, Aborted()))
            return
        self._observe(final)
        batch.append((stream, final))

    def _apply_subscribe(self, sub: KVSubscription, batch: list[tuple[Any, Any]]) -> None:
        cfg = self.engine.config
        snap = SnapshotEvent(
            epoch=self.epoch,
            seq=self._seq,
            block_size=cfg.block_size,
            hashes=[to_hex(h) for h in self.engine.cached_block_hashes()],
        )
        self._subscribers.append(sub)
        batch.append((sub, encode_event(snap)))
        load = _load(self.engine.stats())
        if load == self._load_sent:  # (else a changed load is about to go to every subscriber, this one too)
            batch.append((sub, encode_event(LoadEvent(running=load[0], waiting=load[1], free_blocks=load[2]))))

    def _idle_wait(self) -> float:
        """How long an idle engine thread may block on its queue: less than IDLE_WAIT_S when a load change is
        waiting for the rate limit, so the router learns the final load (e.g. idle) without a next request."""
        if not self._subscribers or _load(self.engine.stats()) == self._load_sent:
            return IDLE_WAIT_S
        return min(IDLE_WAIT_S, max(0.0, self._load_sent_at + LOAD_MIN_INTERVAL_S - time.monotonic()))

    def _publish_load(self, batch: list[tuple[Any, Any]], stats: EngineStats) -> None:
        """A `load` line to every subscriber when (running, waiting, free_blocks) changed, at most every
        LOAD_MIN_INTERVAL_S; it carries no seq (GUIDE section 2)."""
        if not self._subscribers:
            return
        load = _load(stats)
        now = time.monotonic()
        if load == self._load_sent or now - self._load_sent_at < LOAD_MIN_INTERVAL_S:
            return
        self._load_sent, self._load_sent_at = load, now
        line = encode_event(LoadEvent(running=load[0], waiting=load[1], free_blocks=load[2]))
        batch.extend((sub, line) for sub in self._subscribers)

    def _publish_kv_events(self, batch: list[tuple[Any, Any]]) -> None:
        self._subscribers = [s for s in self._subscribers if not s.closed]
        for kind, hashes, parent in self.engine.drain_kv_events():
            self._seq += 1
            if kind == "stored":
                ev: Any = BlockStoredEvent(
                    seq=self._seq,
                    parent=to_hex(parent) if parent is not None else None,
                    hashes=[to_hex(h) for h in hashes],
                )
            elif kind == "removed":
                ev = BlockRemovedEvent(seq=self._seq, hashes=[to_hex(h) for h in hashes])
            else:
                ev = AllBlocksClearedEvent(seq=self._seq)
            line = encode_event(ev)
            batch.extend((sub, line) for sub in self._subscribers)

    def _post(self, batch: list[tuple[Any, Any]], stats: Any, added: int) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed under us during shutdown
            loop.call_soon_threadsafe(self._deliver, batch, stats, added)

    # ---- back on the event loop ----

    def _deliver(self, batch: list[tuple[Any, Any]], stats: Any, added: int) -> None:
        if stats is not None:
            self.stats = stats
        self._pending_adds = max(0, self._pending_adds - added)
        for target, item in batch:
            if isinstance(target, KVSubscription):
                self._deliver_kv(target, item)
                continue
            if _is_terminal(item):
                self._active.pop(target.request_id, None)
            target.queue.put_nowait(item)

    @staticmethod
    def _deliver_kv(sub: KVSubscription, item: Any) -> None:
        if sub.closed:
            return
        if item is not _END and sub.queue.qsize() >= KV_SUBSCRIBER_MAX_BACKLOG:
            # Too far behind: cut it off; it reconnects and resyncs from a fresh snapshot.
            sub.closed = True
            while not sub.queue.empty():
                sub.queue.get_nowait()
            item = _END
        sub.queue.put_nowait(item)


def _set_result(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _set_exception(fut: asyncio.Future[None], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _load(st: EngineStats) -> tuple[int, int, int]:
    """What a `load` line reports: (running, waiting, free_blocks)."""
    return st.num_running, st.num_waiting, st.blocks_total - st.blocks_used
