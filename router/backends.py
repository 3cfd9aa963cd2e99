"""The replicas the router may use: discovery sets them, probes and request outcomes judge them.

A backend takes new requests only while discovery says Ready (not Terminating), its last health probes
passed, and its circuit breaker is closed (or half-open for one trial request). Requests already running on
a backend that leaves continue; it simply gets no new ones.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import aiohttp

from kubellm import metric_names as mn
from kubellm.router.engine_load import EngineLoad
from kubellm.router.metrics import RouterMetrics

log = logging.getLogger("kubellm.router.backends")


@dataclass(frozen=True)
class EndpointInfo:
    """What discovery knows of one endpoint."""

    url: str
    ready: bool = True
    terminating: bool = False
    models: frozenset[str] | None = None  # pinned by static MODEL=URL; None = learned from /v1/models


@dataclass
class Backend:
    url: str
    slot: int  # never reused, so stale prefix-index entries of a departed replica cannot alias a new one
    pinned_models: frozenset[str] | None = None
    served_models: frozenset[str] | None = None
    ready: bool = True
    terminating: bool = False
    healthy: bool = True  # optimistic on arrival; a probe runs at once
    removed: bool = False
    in_flight: int = 0
    answering: int = 0  # in-flight requests whose first byte came back
    waiting: int = 0
    engine_load: EngineLoad | None = None  # the last `load` line of its KV-event stream (None: no live stream)
    max_model_lens: dict[str, int] = field(default_factory=dict)  # model -> its max_model_len, from /v1/models
    probe_failures: int = 0
    consecutive_failures: int = 0
    breaker_open_until: float = 0.0
    half_open_trial: bool = False

    def in_flight_now(self) -> float:
        return float(self.in_flight)

    def models(self) -> frozenset[str] | None:
        return self.pinned_models if self.pinned_models is not None else self.served_models

    def serves(self, model: str, configured: Iterable[str]) -> bool:
        models = self.models()
        if models is None:
            return model in configured or not configured
        return model in models

    def takes_requests(self, now: float) -> bool:
        if self.removed or not self.ready or self.terminating or not self.healthy:
            return False
        if not self.breaker_open_until:
            return True
        return now >= self.breaker_open_until and not self.half_open_trial  # half-open: one trial at a time


# Every assignment to a field `BackendRegistry.routable` reads (besides in_flight) counts here, so the registry can
# keep each model's routable list between changes instead of scanning every backend for every request. Fields are
# read through a C-level getter (attrgetter in a property): no Python frame on the hot path's reads.
_changes = [0]
_WATCHED = (
    "ready",
    "terminating",
    "healthy",
    "removed",
    "pinned_models",
    "served_models",
    "breaker_open_until",
    "half_open_trial",
)


def _watch(cls: type, names: Iterable[str]) -> None:
    """Turn the dataclass fields `names` into properties whose setters count a change in `_changes` (the
    dataclass's __init__ assigns through them too)."""
    for name in names:
        private = "_w_" + name

        def setter(self: Any, value: Any, private: str = private) -> None:
            self.__dict__[private] = value
            _changes[0] += 1

        setattr(cls, name, property(attrgetter(private), setter))


_watch(Backend, _WATCHED)


def _metric_value(text: str, name: str) -> float | None:
    """Sum of a metric family's samples in Prometheus text (all label sets)."""
    total, seen = 0.0, False
    for m in re.finditer(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.eE+-]+|NaN)$", text, re.MULTILINE):
        try:
            total += float(m.group(1))
            seen = True
        except ValueError:
            continue
    return total if seen else None


class BackendRegistry:
    def __init__(
        self,
        configured_models: Iterable[str],
        metrics: RouterMetrics,
        breaker_threshold: int = 5,
        breaker_cooldown: float = 5.0,
        max_inflight: int = 0,
    ):
        self.configured_models = frozenset(configured_models)
        self.metrics = metrics
        self.breaker_threshold = breaker_threshold
        self.breaker_cooldown = breaker_cooldown
        self.max_inflight = max_inflight
        self.backends: dict[str, Backend] = {}
        self._slots = itertools.count()
        self._changed = asyncio.Event()
        self._waiters = 0
        self.on_added: list[Callable[[Backend], None]] = []
        self.on_removed: list[Callable[[Backend], None]] = []
        # model -> (_changes[0] when computed, routable backends, their slots): valid while nothing routable reads
        # changed; kept only where the answer depends on no clock or count (no open breaker, no max_inflight)
        self._routable: dict[str, tuple[int, list[Backend], list[int]]] = {}

    # --- discovery -------------------------------------------------------------------------------
    def set_endpoints(self, endpoints: Iterable[EndpointInfo]) -> None:
        """Make the backend set equal to `endpoints` (discovery's whole current view)."""
        desired = {e.url.rstrip("/"): e for e in endpoints}
        for url in list(self.backends):
            if url not in desired:
                self._remove(url)
        for url, info in desired.items():
            b = self.backends.get(url)
            if b is None:
                b = Backend(url=url, slot=next(self._slots), pinned_models=info.models)
                b.ready, b.terminating = info.ready, info.terminating
                self.backends[url] = b
                _changes[0] += 1
                self.metrics.in_flight.labels(url).set_function(b.in_flight_now)  # read when scraped
                self.metrics.discovery_events.labels("added").inc()
                for cb in self.on_added:
                    cb(b)
            else:
                if (b.ready, b.terminating) != (info.ready, info.terminating):
                    kind = "terminating" if info.terminating else "ready" if info.ready else "not_ready"
                    self.metrics.discovery_events.labels(kind).inc()
                b.ready, b.terminating, b.pinned_models = info.ready, info.terminating, info.models
            self._export_health(b)
        self.notify()

    def _remove(self, url: str) -> None:
        _changes[0] += 1
        b = self.backends.pop(url)
        b.removed = True
        self.metrics.discovery_events.labels("removed").inc()
        self.metrics.forget_backend(url)
        for cb in self.on_removed:
            cb(b)

    # --- selection -------------------------------------------------------------------------------
    def knows_model(self, model: str) -> bool:
        if model in self.configured_models:
            return True
        return any(model in (b.models() or ()) for b in self.backends.values() if b.healthy)

    def model_ids(self) -> list[str]:
        ids = set(self.configured_models)
        for b in self.backends.values():
            if b.healthy and b.ready and not b.removed:
                ids.update(b.models() or ())
        return sorted(ids)

    def max_model_len(self, model: str) -> int | None:
        """The shortest context any live replica of `model` reports: a request that fits it fits wherever routed."""
        lens = [
            b.max_model_lens[model]
            for b in self.backends.values()
            if b.healthy and b.ready and not b.removed and model in b.max_model_lens
        ]
        return min(lens) if lens else None

    def routable_slots(self, model: str) -> tuple[list[Backend], list[int]]:
        """routable(model)'s backends and their slots, from the cache while nothing it reads changed (every request's
        first attempt; the lists are shared: read them, never change them)."""
        hit = self._routable.get(model)
        if hit is not None and hit[0] == _changes[0]:
            return hit[1], hit[2]
        at = _changes[0]
        backends, _ = self.routable(model)
        slots = [b.slot for b in backends]
        if not self.max_inflight and not any(b.breaker_open_until for b in self.backends.values()):
            if len(self._routable) >= 256:  # (models: a few; never unbounded)
                self._routable.clear()
            self._routable[model] = (at, backends, slots)
        return backends, slots

    def routable(self, model: str, exclude: Iterable[int] = ()) -> tuple[list[Backend], bool]:
        """(backends that may take this request now, whether any serving replica exists but is saturated).

        Backend.takes_requests and Backend.serves, inlined: this runs for every replica of every request
        (tests/router/test_router_backends.py checks the two agree over random states)."""
        now = time.monotonic()
        skip = set(exclude) if exclude else ()
        configured = self.configured_models
        max_inflight = self.max_inflight
        out, saturated = [], False
        for b in self.backends.values():
            if b.removed or not b.ready or b.terminating or not b.healthy:
                continue
            if b.breaker_open_until and (now < b.breaker_open_until or b.half_open_trial):
                continue
            models = b.pinned_models if b.pinned_models is not None else b.served_models
            if (model not in models) if models is not None else (configured and model not in configured):
                continue
            if skip and b.slot in skip:
                continue
            if max_inflight and b.in_flight >= max_inflight:
                saturated = True
                continue
            out.append(b)
        return out, saturated

    # --- request accounting ----------------------------------------------------------------------
    def acquire(self, b: Backend) -> None:
        b.in_flight += 1
        if b.breaker_open_until and b.breaker_open_until <= time.monotonic():
            b.half_open_trial = True  # one trial request while half-open

    def answered(self, b: Backend) -> None:
        """The replica sent a request's first byte: it is past queueing and prefill."""
        b.answering += 1

    def release(self, b: Backend, answered: bool = False) -> None:
        b.in_flight -= 1
        if answered:
            b.answering -= 1
        if b.half_open_trial:  # the trial's outcome (if any) was recorded; a cancelled one allows another
            b.half_open_trial = False
        if self._waiters:
            self.notify()

    def record_success(self, b: Backend) -> None:
        b.consecutive_failures = 0
        if b.breaker_open_until:
            b.breaker_open_until, b.half_open_trial = 0.0, False
            self.notify()

    def record_failure(self, b: Backend, connect_error: bool = False) -> None:
        """A failed request: a refused connection ejects at once; repeated failures open the breaker."""
        b.consecutive_failures += 1
        if connect_error and b.healthy:
            b.healthy = False
            log.warning("backend %s ejected: connection failed", b.url)
            self._export_health(b)
        if b.half_open_trial or b.consecutive_failures >= self.breaker_threshold:
            b.breaker_open_until = time.monotonic() + self.breaker_cooldown
            b.half_open_trial = False
            log.warning("backend %s: circuit breaker open for %.1fs", b.url, self.breaker_cooldown)

    # --- health ----------------------------------------------------------------------------------
    def set_healthy(self, b: Backend, healthy: bool) -> None:
        if healthy != b.healthy:
            log.info("backend %s %s", b.url, "re-admitted" if healthy else "ejected")
            b.healthy = healthy
            if healthy:
                b.consecutive_failures = 0
            self.notify()
        self._export_health(b)

    def _export_health(self, b: Backend) -> None:
        if not b.removed:
            self.metrics.backend_healthy.labels(b.url).set(1 if b.takes_requests(time.monotonic()) else 0)

    # --- change notification (the wait queue sleeps on it) ---------------------------------------
    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_changed(self, timeout: float) -> None:
        event = self._changed
        self._waiters += 1
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self._waiters -= 1


class HealthChecker:
    """Active probes: GET /health (ejection after `unhealthy_threshold` failures, re-admission after one
    success), plus /v1/models (what the replica serves) and /metrics (its waiting queue and KV capacity)."""

    def __init__(
        self,
        registry: BackendRegistry,
        session: aiohttp.ClientSession,
        interval: float = 2.0,
        timeout: float = 1.0,
        unhealthy_threshold: int = 2,
        headers: dict[str, str] | None = None,
        on_capacity: Callable[[Backend, int], None] | None = None,
        on_healthy: Callable[[Backend], None] | None = None,
    ):
        self.registry = registry
        self.session = session
        self.interval = interval
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.unhealthy_threshold = unhealthy_threshold
        self.headers = headers or {}
        self.on_capacity = on_capacity
        self.on_healthy = on_healthy
        self._wake = asyncio.Event()

    def probe_soon(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self.probe_all()
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass

    async def probe_all(self) -> None:
        backends = list(self.registry.backends.values())
        if backends:
            await asyncio.gather(*(self.probe(b) for b in backends), return_exceptions=True)

    async def probe(self, b: Backend) -> None:
        ok, refused = False, False
        try:
            async with self.session.get(f"{b.url}/health", timeout=self.timeout, headers=self.headers) as r:
                ok = r.status == 200
                await r.read()
        except aiohttp.ClientConnectorError:
            refused = True
        except (aiohttp.ClientError, TimeoutError):
            pass
        if b.removed:
            return
        if ok:
            b.probe_failures = 0
            await self._learn(b)
            self.registry.set_healthy(b, True)
            if self.on_healthy:
                self.on_healthy(b)
            return
        b.probe_failures += 1
        if refused or b.probe_failures >= self.unhealthy_threshold:
            self.registry.set_healthy(b, False)

    async def _learn(self, b: Backend) -> None:
        try:
            async with self.session.get(f"{b.url}/v1/models", timeout=self.timeout, headers=self.headers) as r:
                if r.status == 200:
                    data = await r.json()
                    cards = [m for m in data.get("data", []) if "id" in m]
                    b.served_models = frozenset(m["id"] for m in cards)
                    b.max_model_lens = {m["id"]: m["max_model_len"] for m in cards if m.get("max_model_len")}
            async with self.session.get(f"{b.url}/metrics", timeout=self.timeout) as r:
                if r.status == 200:
                    text = await r.text()
                    waiting = _metric_value(text, mn.NUM_REQUESTS_WAITING)
                    b.waiting = int(waiting) if waiting is not None else 0
                    capacity = _metric_value(text, mn.KV_CACHE_BLOCKS_TOTAL)
                    if capacity and capacity > 0 and self.on_capacity:
                        self.on_capacity(b, int(capacity))
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as e:
            log.debug("backend %s: could not read models/metrics: %s", b.url, e)
