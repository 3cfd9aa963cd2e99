"""Subscribes to each replica's GET /v1/kv_events (NDJSON) and keeps its PreciseIndex in step.

A snapshot starts (or restarts) the replica's state; a new epoch or a gap in seq means events were lost,
so the state is dropped and the stream re-opened for a fresh snapshot. While a replica has no live stream
(not supported, reconnecting) the prefix policy falls back to the approximate index for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiohttp
from pydantic import ValidationError

from kubellm.kv_events import LoadEvent, SnapshotEvent, decode_event
from kubellm.router.prefix_index import ApplyResult, PreciseIndex

log = logging.getLogger("kubellm.router.kv_events")

MAX_LINE = 64 * 1024 * 1024  # a snapshot of a large cache is one long line


class KVEventSubscriber:
    def __init__(
        self,
        url: str,
        index: PreciseIndex,
        session: aiohttp.ClientSession,
        headers: dict[str, str] | None = None,
        on_snapshot: Callable[[SnapshotEvent], None] | None = None,
        on_load: Callable[[LoadEvent | None], None] | None = None,
        retry_delay: float = 0.5,
        unsupported_delay: float = 30.0,
    ):
        self.url = url.rstrip("/") + "/v1/kv_events"
        self.index = index
        self.session = session
        self.headers = headers or {}
        self.on_snapshot = on_snapshot
        self.on_load = on_load  # a load line; None when the stream ends (its load is no longer known)
        self.retry_delay = retry_delay
        self.unsupported_delay = unsupported_delay
        self.resyncs = 0
        self.attempts = 0  # subscriptions that ended (or failed): start-up stops waiting for a snapshot after one
        self._task: asyncio.Task[None] | None = None

    def settled(self) -> bool:
        """A snapshot arrived, or the first subscription ended without one (unsupported, unreachable)."""
        return self.index.live or self.attempts > 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name=f"kv-events {self.url}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self.index.drop()

    async def run(self) -> None:
        delay = self.retry_delay
        while True:
            try:
                status = await self._consume_once()
                delay = self.unsupported_delay if status == 404 else self.retry_delay
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, TimeoutError, ValueError, ValidationError) as e:
                log.debug("kv events %s: %s", self.url, e)
                delay = min(delay * 2, 5.0)
            self.attempts += 1
            self.index.drop()
            if self.on_load:
                self.on_load(None)
            await asyncio.sleep(delay)

    async def _consume_once(self) -> int:
        """Read one subscription until it ends or needs a resync; returns the HTTP status."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=3, sock_read=None)
        async with self.session.get(self.url, headers=self.headers, timeout=timeout) as resp:
            if resp.status != 200:
                return resp.status
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                if len(buf) > MAX_LINE:
                    raise ValueError("kv event line too long")
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    event = decode_event(line)
                    if isinstance(event, LoadEvent):  # outside the seq numbering: never a gap
                        if self.on_load:
                            self.on_load(event)
                        continue
                    if self.index.apply(event) is ApplyResult.RESYNC:
                        self.resyncs += 1
                        log.info("kv events %s: gap or new epoch, resubscribing", self.url)
                        return 200
                    if isinstance(event, SnapshotEvent) and self.on_snapshot:
                        self.on_snapshot(event)
            return 200
