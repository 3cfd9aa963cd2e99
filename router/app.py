"""The router's aiohttp application: OpenAI endpoints in, one replica out per attempt.

`Router` wires discovery -> backend registry -> policy (+ prefix index, KV event subscribers, tokenizer)
-> proxy, and owns the background tasks. `RouterServer` runs it on a port (the CLI and the tests use it).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import random
import time
from collections.abc import Awaitable
from functools import partial
from typing import Any
from urllib.parse import unquote

import aiohttp
import orjson
from aiohttp import web
from pydantic import ValidationError
from yarl import URL

from kubellm.block_hash import DEFAULT_BLOCK_SIZE
from kubellm.kv_events import LoadEvent, SnapshotEvent
from kubellm.openai_errors import APIError, check_json_content_type, error_json, model_not_found, route_error
from kubellm.openai_protocol import ModelCard, ModelList
from kubellm.prompt import TokenizerInfo
from kubellm.router.backends import Backend, BackendRegistry, HealthChecker
from kubellm.router.config import RouterConfig
from kubellm.router.discovery import make_discovery
from kubellm.router.engine_load import EngineLoad, combined_load
from kubellm.router.http_server import Exchange, HTTPServer, Request
from kubellm.router.kv_events_client import KVEventSubscriber
from kubellm.router.metrics import RouterMetrics, read_retired, render_merged, write_final
from kubellm.router.policies import RouteRequest, make_policy
from kubellm.router.policies.prefix import PrefixPolicy
from kubellm.router.prefix_index import PrefixIndex
from kubellm.router.proxy import Target, UpstreamFailure, forward
from kubellm.router.queue import WaitQueue
from kubellm.router.request_body import RoutedBody, parse_routed_body
from kubellm.router.tokenization import PromptHasher, PromptKey
from kubellm.router.upstream import UpstreamPool
from kubellm.router.workers import WorkerPlacement
from kubellm.routing import RoutingPolicy

log = logging.getLogger("kubellm.router")

_ROUTED_PATHS = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}
_JSON = ("Content-Type", "application/json")


def _unauthorized() -> APIError:
    return APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)", code="invalid_api_key")


_ERROR_REF = {"$ref": "#/components/schemas/Error"}


def _op(summary: str, body: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {"200": {"description": "OK"}}}
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}
        op["responses"].update(
            {code: {"description": d, "content": {"application/json": {"schema": _ERROR_REF}}}
             for code, d in (("400", "malformed request"), ("401", "missing or wrong API key"),
                             ("404", "model not served"), ("413", "body too large"),
                             ("415", "body not sent as application/json"),
                             ("503", "no replica within the queue timeout (Retry-After)"))}
        )  # fmt: skip
    return op


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "kubellm router", "version": "1"},
    "paths": {
        "/v1/chat/completions": {"post": _op("Chat completion, routed to a replica (SSE when stream=true)", True)},
        "/v1/completions": {"post": _op("Text completion, routed to a replica (SSE when stream=true)", True)},
        "/v1/models": {"get": _op("Models served: configured plus those healthy replicas report")},
        "/v1/models/{model}": {
            "get": {
                "summary": "One model's card (404 in OpenAI's shape if not served)",
                "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {
                    "200": {"description": "OK"},
                    "404": {"description": "model not served", "content": {"application/json": {"schema": _ERROR_REF}}},
                },
            }
        },
        "/health": {"get": _op("The router is up")},
        "/metrics": {"get": _op("Prometheus metrics")},
    },
    "components": {
        "schemas": {
            "Error": {
                "type": "object",
                "properties": {
                    "error": {
                        "type": "object",
                        "properties": {
                            "message": {"type": "string"},
                            "type": {"type": "string"},
                            "param": {"type": ["string", "null"]},
                            "code": {"type": ["string", "integer", "null"]},
                        },
                    }
                },
            }
        }
    },
}


class Router:
    def __init__(self, config: RouterConfig, worker: WorkerPlacement | None = None):
        self.config = config
        self.worker = worker  # one of `--workers N` processes (None: the only one)
        self.metrics = RouterMetrics()
        self.registry = BackendRegistry(
            config.models,
            self.metrics,
            breaker_threshold=config.breaker_threshold,
            breaker_cooldown=config.breaker_cooldown,
            max_inflight=config.max_inflight_per_backend,
        )
        self.policy = make_policy(
            config.policy,
            config.balance_factor,
            config.load_floor,
            config.prefix_min_match_ratio,
            config.prefix_min_match_tokens,
        )
        # the prefix policy's pick without rows (_try_pick), while no replica sends engine load lines (_load_lines)
        self._prefix = self.policy if isinstance(self.policy, PrefixPolicy) else None
        self._load_lines: set[int] = set()  # slots of backends whose engine_load is set
        self.index = PrefixIndex(config.approx_index_size, use_events=config.kv_events)
        self.hasher = PromptHasher(
            self._fetch_tokenizer_info, text_block_chars=config.text_block_chars, tokenizer=config.tokenizer
        )
        self.queue = WaitQueue(self.registry, self.metrics, config.queue_size, config.queue_timeout)
        self.session: aiohttp.ClientSession | None = None  # probes, KV events, tokenizer info
        self.pool: UpstreamPool | None = None  # the routed requests themselves
        self.health: HealthChecker | None = None
        self.subscribers: dict[int, KVEventSubscriber] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._warming: asyncio.Task[None] | None = None
        self._targets: dict[tuple[str, str], Target] = {}
        self._session_header = config.session_header.lower()
        self._policy_name = self.policy.name.value
        self._rid_prefix, self._rid_count = os.urandom(8).hex(), 0
        self._outcomes: dict[tuple[str, str, str, str], tuple[Any, Any, Any]] = {}  # (_outcome_metrics)
        self._ttfbs: dict[str, Any] = {}  # model -> its time-to-first-byte histogram child
        self._match_ratio = self.metrics.child(self.metrics.match_ratio)
        auth = f"Authorization: Bearer {config.upstream_api_key}\r\n" if config.upstream_api_key else ""
        self._head_prefix = f"Content-Type: application/json\r\n{auth}".encode("latin-1")
        self._get_routes = {
            "/health": self.handle_health,
            "/metrics": self.handle_metrics,
            "/v1/models": self.handle_models,
            "/openapi.json": self.handle_openapi,
        }
        self._started = int(time.time())
        self._upstream_headers = (
            {"Authorization": f"Bearer {config.upstream_api_key}"} if config.upstream_api_key else {}
        )
        self._api_keys = [k.encode() for k in config.api_keys]
        self.registry.on_added.append(self._backend_added)
        self.registry.on_removed.append(self._backend_removed)

    # --- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=30, keepalive_timeout=60, enable_cleanup_closed=True)
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
            cookie_jar=aiohttp.DummyCookieJar(),  # never carry one client's cookies to another's request
        )
        self.pool = UpstreamPool(self.config.connect_timeout, self.config.request_timeout)
        self.health = HealthChecker(
            self.registry,
            self.session,
            interval=self.config.health_interval,
            timeout=self.config.health_timeout,
            unhealthy_threshold=self.config.unhealthy_threshold,
            headers=self._upstream_headers,
            on_capacity=lambda b, cap: self.index.replica(b.slot).set_capacity(cap),
            on_healthy=self._backend_healthy,
        )
        discovery = make_discovery(self.config, self.registry, self.session)
        await discovery.start()
        for b in list(self.registry.backends.values()):
            self._backend_added(b)  # static backends arrived before the session existed
        try:  # know who is up (and what they serve) before the first request; never wait long
            await asyncio.wait_for(self.health.probe_all(), self.config.health_timeout + 0.5)
        except TimeoutError:
            pass
        self._tasks.append(asyncio.create_task(discovery.run(), name="discovery"))
        self._tasks.append(asyncio.create_task(self.health.run(), name="health"))
        # Listen at once and hold requests until warm: a restarted router refusing connections while it warms up
        # would fail clients' retries (seen in the soak test), where a short wait costs them nothing.
        self._warming = asyncio.create_task(self._warm_up(self.config.warmup_timeout), name="warm-up")
        self._tasks.append(self._warming)

    async def _warm_up(self, timeout: float) -> None:
        """Wait (bounded) for the replicas' KV snapshots and the tokenizer; requests arriving meanwhile wait for it, so
        a restarted router routes its first request on a warm index, as its predecessor would have."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = time.monotonic()
            up = [b for b in self.registry.backends.values() if b.takes_requests(now)]
            subs_ready = all(s.settled() for b in up if (s := self.subscribers.get(b.slot)) is not None)
            models = {m for b in up for m in (b.models() or self.registry.configured_models)}
            prefix = self.policy.name is RoutingPolicy.PREFIX
            if subs_ready and (not prefix or all(self.hasher.settled(m) for m in models)):
                return
            await asyncio.sleep(0.01)
        log.info("start-up: KV snapshots or the tokenizer not all in after %.1fs; serving anyway", timeout)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        for sub in list(self.subscribers.values()):
            await sub.stop()
        self.subscribers.clear()
        if self.pool:
            self.pool.close()
        self.hasher.close()
        if self.session:
            await self.session.close()

    def _backend_added(self, b: Backend) -> None:
        if self.session is None:
            return
        if self.health:
            self.health.probe_soon()
        if self.config.kv_events and b.slot not in self.subscribers:
            replica = self.index.replica(b.slot)
            self.metrics.kv_event_seq.labels(b.url).set_function(
                lambda r=replica: float(r.seq) if r.live and r.seq is not None else -1.0
            )
            sub = KVEventSubscriber(
                b.url,
                replica,
                self.session,
                headers=self._upstream_headers,
                on_snapshot=lambda ev, b=b: self._on_snapshot(b, ev),
                on_load=lambda ev, b=b: self._on_load(b, ev),
            )
            self.subscribers[b.slot] = sub
            sub.start()

    def _backend_healthy(self, b: Backend) -> None:
        if self.policy.name is RoutingPolicy.PREFIX:
            for m in b.models() or self.registry.configured_models:
                self.hasher.prefetch(m)

    def _backend_removed(self, b: Backend) -> None:
        sub = self.subscribers.pop(b.slot, None)
        if sub is not None:
            asyncio.get_running_loop().create_task(sub.stop())
        self.index.drop_replica(b.slot)
        self._load_lines.discard(b.slot)

    def _on_load(self, b: Backend, ev: LoadEvent | None) -> None:
        if b.removed:  # (a line read after the removal, before its stream's stop ran: it would stay in _load_lines)
            return
        b.engine_load = EngineLoad.of(ev, b.in_flight) if ev is not None else None
        if ev is not None:
            self._load_lines.add(b.slot)
        else:
            self._load_lines.discard(b.slot)

    def _on_snapshot(self, b: Backend, ev: SnapshotEvent) -> None:
        for m in b.models() or self.registry.configured_models:
            self.hasher.block_sizes[m] = ev.block_size

    async def _fetch_tokenizer_info(self, model: str) -> TokenizerInfo | None:
        assert self.session is not None
        backends, _ = self.registry.routable(model)
        for b in backends:
            try:
                url, timeout = f"{b.url}/v1/tokenizer_info", aiohttp.ClientTimeout(total=10)
                async with self.session.get(url, headers=self._upstream_headers, timeout=timeout) as r:
                    if r.status == 200:
                        return TokenizerInfo.model_validate_json(await r.read())
            except (aiohttp.ClientError, TimeoutError, ValidationError) as e:
                log.debug("tokenizer_info from %s failed: %s", b.url, e)
        return None

    # --- dispatch (the lean server calls this for every request) -----------------------------------------
    def handle(self, req: Request, ex: Exchange) -> Awaitable[None]:
        """A routed POST's coroutine is handed to the server as it is: no frame of this method stays between the
        server and handle_inference (each level costs every request its creation and a step on each resume)."""
        kind = _ROUTED_PATHS.get(req.path)
        if kind is not None and req.method == "POST" and (not self._api_keys or self._authorized(req)):
            return self.handle_inference(req, ex, kind)
        return self._dispatch(req, ex)

    async def _dispatch(self, req: Request, ex: Exchange) -> None:
        """Everything but an authorized routed POST: errors, and the GET routes."""
        path = req.path
        kind = _ROUTED_PATHS.get(path)
        if kind is not None:
            if req.method != "POST":
                return self._error(ex, route_error(405, req.method, path, "POST"))
            if self._api_keys and not self._authorized(req):
                return self._error(ex, _unauthorized())
            return await self.handle_inference(req, ex, kind)
        handler = self._get_routes.get(path)
        if handler is None and path.startswith("/v1/models/") and len(path) > 11:
            handler = self.handle_model  # names may hold slashes (org/model)
        if handler is None:
            return self._error(ex, route_error(404, req.method, path))
        if req.method not in ("GET", "HEAD"):
            return self._error(ex, route_error(405, req.method, path, "GET, HEAD"))
        if self._api_keys and path.startswith("/v1/") and not self._authorized(req):
            return self._error(ex, _unauthorized())
        await handler(req, ex)

    def _authorized(self, req: Request) -> bool:
        auth = req.headers.get("authorization", "")
        token = auth[7:].strip().encode() if auth[:7].lower() == "bearer " else b""
        return any(hmac.compare_digest(token, k) for k in self._api_keys)

    @staticmethod
    def _error(ex: Exchange, err: APIError) -> None:
        ex.respond(err.status, err.json(), [_JSON, *err.headers.items()])

    # --- handlers --------------------------------------------------------------------------------
    async def handle_health(self, req: Request, ex: Exchange) -> None:
        if self._warming is not None and not self._warming.done():  # not ready yet: a Service sends elsewhere
            return ex.respond(503, orjson.dumps({"status": "warming up"}), (_JSON,))
        now = time.monotonic()
        up = sum(1 for b in self.registry.backends.values() if b.takes_requests(now))
        body = {"status": "ok", "backends": len(self.registry.backends), "routable": up}
        ex.respond(200, orjson.dumps(body), (_JSON,))

    async def handle_metrics(self, req: Request, ex: Exchange) -> None:
        if self.worker is None:
            body = self.metrics.render()
        else:  # one view of all workers: theirs merged with ours, and what workers that died had counted
            peers = await asyncio.gather(*(self._peer_snapshot(p) for p in self.worker.peer_socket_paths()))
            retired = read_retired(self.worker.metrics_dir)
            body = render_merged([self.metrics.snapshot(), *(p for p in peers if p is not None), retired])
        ex.respond(200, body, (("Content-Type", "text/plain; version=0.0.4"),))

    async def _peer_snapshot(self, socket_path: str) -> list[dict[str, Any]] | None:
        """Another worker's metric samples over its unix socket; None if it is not up (restarting)."""
        try:
            async with (
                aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=socket_path)) as s,
                s.get("http://worker/metrics/local", timeout=aiohttp.ClientTimeout(total=2)) as r,
            ):
                return await r.json() if r.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            log.debug("metrics of worker at %s unavailable: %s", socket_path, e)
            return None

    async def handle_local_metrics(self, request: web.Request) -> web.Response:
        return web.json_response(self.metrics.snapshot())

    def _card(self, model: str) -> ModelCard:
        return ModelCard(id=model, created=self._started, max_model_len=self.registry.max_model_len(model))

    async def handle_models(self, req: Request, ex: Exchange) -> None:
        models = ModelList(data=[self._card(m) for m in self.registry.model_ids()])
        ex.respond(200, models.model_dump_json(exclude_none=True).encode(), (_JSON,))

    async def handle_model(self, req: Request, ex: Exchange) -> None:
        """GET /v1/models/{model}: one card (configured, or served by a live replica), or OpenAI's 404."""
        name = unquote(req.path[len("/v1/models/") :])
        if name not in self.registry.model_ids():
            return self._error(ex, model_not_found(name))
        ex.respond(200, self._card(name).model_dump_json(exclude_none=True).encode(), (_JSON,))

    async def handle_openapi(self, req: Request, ex: Exchange) -> None:
        ex.respond(200, orjson.dumps(OPENAPI), (_JSON,))

    async def handle_inference(self, req: Request, ex: Exchange, kind: str) -> None:
        """A routed request, from its body to its answer, in one coroutine (the routing once lived in a second one
        this awaited: a frame less to create and to step through when the replica's answer resumes it)."""
        started = time.perf_counter()
        model = "unknown"
        try:
            body = self._read_body(req)
            if not self.registry.knows_model(body.model):  # (its name never becomes a metric label)
                raise model_not_found(body.model)
            model = body.model
            if self._warming is not None and not self._warming.done():
                await asyncio.shield(self._warming)
            cfg = self.config
            key: PromptKey | None = None
            if self.policy.name is RoutingPolicy.PREFIX:
                fields = body.fields
                key = self.hasher.text_key_now(model, kind, fields) or await self.hasher.key(model, kind, fields)
            rh = req.headers
            session_key = rh.get(self._session_header) or body.user
            hashes = key.hashes if key else []
            route = RouteRequest(model, session_key, len(hashes), key.block_tokens if key else DEFAULT_BLOCK_SIZE)
            request_id = rh.get("x-request-id") or self._request_id()
            accept = rh.get("accept")
            if accept is not None:
                head = self._upstream_head_accept(accept, request_id)
            else:
                head = self._upstream_head(request_id)
            tried: list[int] = []
            last: UpstreamFailure | None = None
            first_byte = [False]
            if cfg.debug_headers and rh.get("x-kubellm-route-only") == "1":
                # which replica this router would pick now, without sending (bench/router.py measures how often two
                # router replicas agree); counted in no metric, changing nothing but the policy's tie rotation
                backend, reason, _ = self._try_pick(route, hashes, tried) or (None, "", 0)
                found = [("X-Kubellm-Backend", backend.url), ("X-Kubellm-Route", reason)] if backend else []
                return ex.respond(204, b"", [("X-Request-Id", request_id), *found])

            for attempt in range(cfg.max_retries + 1):
                if attempt:
                    self.metrics.retries.labels(model).inc()
                    await asyncio.sleep(min(cfg.retry_backoff * 2 ** (attempt - 1), 0.5) * (0.5 + random.random()))
                # the pick without a coroutine while some replica can take the request (every request but the queued)
                picked = self._try_pick(route, hashes, tried)
                if picked is None:
                    if tried:
                        break
                    picked = await self.queue.wait_for(model, partial(self._try_pick, route, hashes, tried))
                backend, reason, matched = picked
                tried.append(backend.slot)
                resp_headers = [("X-Request-Id", request_id)]
                if cfg.debug_headers:
                    resp_headers += [("X-Kubellm-Backend", backend.url), ("X-Kubellm-Route", reason)]
                self.registry.acquire(backend)
                sent = [False]

                def on_sent(b: Backend = backend, sent: list[bool] = sent) -> None:
                    """The request is on its way (called before anything else can be routed): its blocks count as sent
                    there from now on. After the write, so the replica starts on it before this bookkeeping."""
                    sent[0] = True
                    self.index.on_send(b.slot, hashes)

                def on_first_byte(b: Backend = backend) -> None:
                    first_byte[0] = True
                    self._ttfb(model).observe(time.perf_counter() - started)
                    self.registry.answered(b)

                code = "error"
                try:
                    target = self._upstream_target(backend.url, req.path)
                    if req.query:  # (not cached: one Target per distinct query string would grow without bound)
                        target = target.with_query(req.query)
                    outcome = await forward(
                        self.pool,  # type: ignore[arg-type]
                        target,
                        head,
                        req.body,
                        ex,
                        resp_headers,
                        on_first_byte,
                        on_sent,
                    )
                    code = str(outcome.status)
                    if outcome.died_mid_stream:
                        self.registry.record_failure(backend)
                        if self.health:
                            self.health.probe_soon()
                    else:
                        self.registry.record_success(backend)
                    return
                except UpstreamFailure as e:
                    last = e
                    code = str(e.status or 502)
                    if not e.retryable:
                        break
                    if e.status != 429:
                        self.registry.record_failure(backend, connect_error=e.connect_error)
                        if self.health:
                            self.health.probe_soon()
                    log.info("attempt %d on %s failed: %s", attempt + 1, backend.url, e)
                except (asyncio.CancelledError, ConnectionResetError):
                    code = "499"  # the client went away; closing the upstream connection aborted the request
                    raise
                finally:
                    self.registry.release(backend, answered=first_byte[0])
                    if sent[0]:
                        self.index.on_done(backend.slot, hashes)
                    counted = self._outcome_metrics(model, backend.url, code, reason)
                    counted[0].inc()
                    if first_byte[0] or code != "error":
                        counted[1].observe(time.perf_counter() - started)
                    counted[2].inc()
                    if hashes:
                        self._match_ratio.observe(matched / len(hashes))
            if last is not None and last.status is not None:
                passed = [(k, v) for k, v in last.headers if k in ("Content-Type", "Retry-After")]
                return ex.respond(last.status, last.body, passed)
            raise APIError(502, f"no replica of model {model!r} could answer: {last}", code="upstream_unavailable")
        except APIError as e:
            self.metrics.child(self.metrics.requests, model, "", str(e.status)).inc()
            self._error(ex, e)

    def _read_body(self, req: Request) -> RoutedBody:
        check_json_content_type(req.headers.get("content-type"))  # (the server enforced max_body_bytes)
        if not req.body:
            raise APIError(400, "request body is empty; send a JSON object", code="invalid_json")
        return parse_routed_body(req.body)

    def _outcome_metrics(self, model: str, url: str, code: str, reason: str) -> tuple[Any, Any, Any]:
        """The children a finished attempt counts in (requests by backend and code, duration, decisions by reason),
        found with one lookup (four memoized `child` calls cost a visible share of a request)."""
        key = (model, url, code, reason)
        got = self._outcomes.get(key)
        if got is None:
            if len(self._outcomes) >= 4096:  # (backends come and go: never unbounded)
                self._outcomes.clear()
            m = self.metrics
            got = self._outcomes[key] = (
                m.child(m.requests, model, url, code),
                m.child(m.duration, model),
                m.child(m.decisions, self._policy_name, reason),
            )
        return got

    def _ttfb(self, model: str) -> Any:
        got = self._ttfbs.get(model)
        if got is None:
            got = self._ttfbs[model] = self.metrics.child(self.metrics.ttfb, model)
        return got

    def _request_id(self) -> str:
        """32 hex digits unique across processes: a random per-process half and a counter (uuid4 cost ~10% of a
        routed request's CPU in the profile)."""
        self._rid_count += 1
        return f"{self._rid_prefix}{self._rid_count:016x}"

    def _upstream_head(self, request_id: str) -> bytes:
        """The headers every routed request carries to a replica (after its request line and Host)."""
        return self._head_prefix + b"X-Request-Id: " + request_id.encode("latin-1") + b"\r\n"

    def _upstream_head_accept(self, accept: str, request_id: str) -> bytes:
        return self._upstream_head(request_id) + b"Accept: " + accept.encode("latin-1") + b"\r\n"

    def _upstream_target(self, base: str, path: str) -> Target:
        """Parsed once per (backend, path): URL parsing is a visible share of the per-request cost."""
        target = self._targets.get((base, path))
        if target is None:
            if len(self._targets) > 4096:
                self._targets.clear()
            url = URL(base + path)
            tls = url.scheme == "https"
            target = Target(url.host or "", url.port or (443 if tls else 80), url.raw_path_qs, tls)
            self._targets[(base, path)] = target
        return target

    def _try_pick(self, route: RouteRequest, hashes: list[int], tried: list[int]) -> tuple[Backend, str, int] | None:
        """The backend chosen among the routable replicas, why, and how many leading blocks it holds; None while none
        can take the request (the caller waits in the bounded queue, first attempt only). This runs for every replica
        of every request: the prefix policy reads the backends in place (choose_index); rows, with the load combined
        where an engine sent a load line, only for the other policies or such engines. Metrics are the caller's,
        after the request is sent."""
        if tried:
            backends, _ = self.registry.routable(route.model, exclude=tried)
            slots = [b.slot for b in backends]
        else:  # (a first attempt: the list kept between changes of the backends' state)
            backends, slots = self.registry.routable_slots(route.model)
        if not backends:
            return None
        index = self.index
        matches = index.match_all(slots, hashes)
        fast = self._prefix
        if fast is not None and not self._load_lines:
            # the prefix rule over the backends as they are: no row per replica, footprints read only where the rule
            # does (no earned match); replicas with an engine load line take the general path below
            fps = index.footprints()
            i, reason = fast.choose_index(route, backends, matches, lambda j: fps.get(slots[j], 0))
            return backends[i], reason, matches[i]
        footprints = index.footprints()
        rows = []
        for b, matched in zip(backends, matches, strict=True):
            if b.engine_load is None:  # (combined_load's answer without a load line, without the call)
                rows.append((b.url, b.in_flight, b.answering, b.waiting, matched, footprints.get(b.slot, 0), b))
            else:
                load = combined_load(b.in_flight, b.answering, b.waiting, b.engine_load)
                fp = footprints.get(b.slot, 0)
                rows.append((b.url, load.in_flight, load.answering, load.waiting, matched, fp, b))
        row, reason, matched = self.policy.choose_row(route, rows)
        return row[6], reason, matched


class ListenError(RuntimeError):
    """The router's port cannot be bound (usually: in use); the message names the address and the flag."""


class RouterServer:
    """Runs a Router on host:port; `async with RouterServer(cfg) as s: s.url`. As one of `--workers N` it listens
    with SO_REUSEPORT beside its siblings and answers their metrics requests on a unix socket."""

    def __init__(self, config: RouterConfig, worker: WorkerPlacement | None = None):
        self.config = config
        self.worker = worker
        self.router = Router(config, worker)
        self.http: HTTPServer | None = None
        self.local_runner: web.AppRunner | None = None
        self.shutdown_timeout = 10.0  # requests in progress at stop get this long to finish
        self.port: int = config.port

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "") else self.config.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        await self.router.start()
        cfg = self.config
        self.http = HTTPServer(
            self.router.handle,
            max_body_bytes=cfg.max_body_bytes,
            max_header_bytes=cfg.max_header_bytes,
            error_body=lambda status, message, code: error_json(status, message, None, code),
            request_timeout=cfg.client_timeout,
            eager_paths=_ROUTED_PATHS,  # the request reaches its replica before the loop turns (http_server.py)
        )
        try:
            self.port = await self.http.listen(cfg.host, cfg.port, reuse_port=self.worker is not None)
        except OSError as e:
            await self.router.stop()
            raise ListenError(
                f"cannot listen on {cfg.host}:{cfg.port} ({os.strerror(e.errno) if e.errno else e}); "
                "choose another port with --port"
            ) from e
        if self.worker is not None:
            local = web.Application()
            local.router.add_get("/metrics/local", self.router.handle_local_metrics)
            self.local_runner = web.AppRunner(local, access_log=None)
            await self.local_runner.setup()
            path = self.worker.socket_path()
            if os.path.exists(path):
                os.unlink(path)  # left by this worker's previous life
            await web.UnixSite(self.local_runner, path).start()

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.stop(self.shutdown_timeout)
        if self.worker is not None:  # what this worker counted outlives it in the merged /metrics
            write_final(self.worker.metrics_dir, self.router.metrics.snapshot())
        if self.local_runner:
            await self.local_runner.cleanup()
        await self.router.stop()

    async def __aenter__(self) -> RouterServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
