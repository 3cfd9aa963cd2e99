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
import uuid
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import ValidationError
from yarl import URL

from kubellm.block_hash import DEFAULT_BLOCK_SIZE
from kubellm.kv_events import LoadEvent, SnapshotEvent
from kubellm.openai_errors import APIError, check_json_content_type, model_not_found, route_error
from kubellm.openai_protocol import ModelCard, ModelList
from kubellm.prompt import TokenizerInfo
from kubellm.router.backends import Backend, BackendRegistry, HealthChecker
from kubellm.router.config import RouterConfig
from kubellm.router.discovery import make_discovery
from kubellm.router.engine_load import EngineLoad, combined_load
from kubellm.router.errors import error_response
from kubellm.router.kv_events_client import KVEventSubscriber
from kubellm.router.metrics import RouterMetrics, render_merged
from kubellm.router.policies import Candidate, RouteRequest, make_policy
from kubellm.router.prefix_index import PrefixIndex
from kubellm.router.proxy import UpstreamFailure, forward
from kubellm.router.queue import WaitQueue
from kubellm.router.request_body import RoutedBody, parse_routed_body
from kubellm.router.tokenization import PromptHasher, PromptKey
from kubellm.router.upstream import UpstreamPool
from kubellm.router.workers import WorkerPlacement
from kubellm.routing import RoutingPolicy

log = logging.getLogger("kubellm.router")

_ROUTED_PATHS = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}


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
        self.index = PrefixIndex(config.approx_index_size, use_events=config.kv_events)
        self.hasher = PromptHasher(self._fetch_tokenizer_info)
        self.queue = WaitQueue(self.registry, self.metrics, config.queue_size, config.queue_timeout)
        self.session: aiohttp.ClientSession | None = None  # probes, KV events, tokenizer info
        self.pool: UpstreamPool | None = None  # the routed requests themselves
        self.health: HealthChecker | None = None
        self.subscribers: dict[int, KVEventSubscriber] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._warming: asyncio.Task[None] | None = None
        self._urls: dict[tuple[str, str], URL] = {}
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

    def _on_load(self, b: Backend, ev: LoadEvent | None) -> None:
        b.engine_load = EngineLoad.of(ev, b.in_flight) if ev is not None else None

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

    # --- middleware ------------------------------------------------------------------------------
    @web.middleware
    async def route_errors_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Unknown routes and wrong methods answer in OpenAI's error shape, as the engine's do."""
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status not in (404, 405):
                raise
            return error_response(route_error(e.status, request.method, request.path, e.headers.get("Allow")))

    @web.middleware
    async def auth_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self._api_keys and request.path.startswith("/v1/"):
            auth = request.headers.get("Authorization", "")
            token = auth[7:].strip().encode() if auth[:7].lower() == "bearer " else b""
            if not any(hmac.compare_digest(token, k) for k in self._api_keys):
                return error_response(
                    APIError(
                        401, "invalid or missing API key (send Authorization: Bearer <key>)", code="invalid_api_key"
                    )
                )
        return await handler(request)

    # --- handlers --------------------------------------------------------------------------------
    async def handle_health(self, request: web.Request) -> web.Response:
        if self._warming is not None and not self._warming.done():  # not ready yet: a Service sends elsewhere
            return web.json_response({"status": "warming up"}, status=503)
        now = time.monotonic()
        up = sum(1 for b in self.registry.backends.values() if b.takes_requests(now))
        return web.json_response({"status": "ok", "backends": len(self.registry.backends), "routable": up})

    async def handle_metrics(self, request: web.Request) -> web.Response:
        if self.worker is None:
            body = self.metrics.render()
        else:  # one view of all workers: theirs merged with ours
            peers = await asyncio.gather(*(self._peer_snapshot(p) for p in self.worker.peer_socket_paths()))
            body = render_merged([self.metrics.snapshot(), *(p for p in peers if p is not None)])
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})

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

    async def handle_models(self, request: web.Request) -> web.Response:
        models = ModelList(data=[self._card(m) for m in self.registry.model_ids()])
        return web.Response(body=models.model_dump_json(exclude_none=True), content_type="application/json")

    async def handle_model(self, request: web.Request) -> web.Response:
        """GET /v1/models/{model}: one card (configured, or served by a live replica), or OpenAI's 404."""
        name = request.match_info["model"]
        if name not in self.registry.model_ids():
            return error_response(model_not_found(name))
        body = self._card(name).model_dump_json(exclude_none=True)
        return web.Response(body=body, content_type="application/json")

    async def handle_openapi(self, request: web.Request) -> web.Response:
        return web.json_response(OPENAPI)

    async def handle_inference(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        kind = _ROUTED_PATHS[request.path]
        model = "unknown"
        try:
            raw, body = await self._read_body(request)
            if not self.registry.knows_model(body.model):  # (its name never becomes a metric label)
                raise model_not_found(body.model)
            model = body.model
            if self._warming is not None and not self._warming.done():
                await asyncio.shield(self._warming)
            return await self._route(request, kind, raw, body, started)
        except APIError as e:
            self.metrics.child(self.metrics.requests, model, "", str(e.status)).inc()
            return error_response(e)

    async def _read_body(self, request: web.Request) -> tuple[bytes, RoutedBody]:
        check_json_content_type(request.headers.get("Content-Type"))
        if request.content_length is not None and request.content_length > self.config.max_body_bytes:
            raise APIError(413, f"request body exceeds {self.config.max_body_bytes} bytes", code="body_too_large")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge as e:
            raise APIError(
                413, f"request body exceeds {self.config.max_body_bytes} bytes", code="body_too_large"
            ) from e
        if not raw:
            raise APIError(400, "request body is empty; send a JSON object", code="invalid_json")
        return raw, parse_routed_body(raw)

    async def _route(
        self, request: web.Request, kind: str, raw: bytes, body: RoutedBody, started: float
    ) -> web.StreamResponse:
        cfg = self.config
        model = body.model
        key: PromptKey | None = None
        if self.policy.name is RoutingPolicy.PREFIX:
            key = await self.hasher.key(model, kind, body.fields)
        session_key = request.headers.get(cfg.session_header) or body.user
        hashes = key.hashes if key else []
        route = RouteRequest(model, session_key, len(hashes), key.block_tokens if key else DEFAULT_BLOCK_SIZE)
        request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        headers = {"Content-Type": "application/json", "X-Request-Id": request_id, **self._upstream_headers}
        if "Accept" in request.headers:
            headers["Accept"] = request.headers["Accept"]
        tried: list[int] = []
        last: UpstreamFailure | None = None
        first_byte = [False]
        if cfg.debug_headers and request.headers.get("X-Kubellm-Route-Only") == "1":
            # which replica this router would pick now, without sending (bench/router.py measures how often two
            # router replicas agree); counted in no metric, changing nothing but the policy's tie rotation
            backend, reason = await self._pick(route, hashes, tried, allow_wait=False, observe=False)
            found = {"X-Kubellm-Backend": backend.url, "X-Kubellm-Route": reason} if backend else {}
            return web.Response(status=204, headers={"X-Request-Id": request_id, **found})

        for attempt in range(cfg.max_retries + 1):
            if attempt:
                self.metrics.retries.labels(model).inc()
                await asyncio.sleep(min(cfg.retry_backoff * 2 ** (attempt - 1), 0.5) * (0.5 + random.random()))
            backend, reason = await self._pick(route, hashes, tried, allow_wait=not tried)
            if backend is None:
                break
            tried.append(backend.slot)
            resp_headers = {"X-Request-Id": request_id}
            if cfg.debug_headers:
                resp_headers["X-Kubellm-Backend"] = backend.url
                resp_headers["X-Kubellm-Route"] = reason
            self.registry.acquire(backend)
            self.index.on_send(backend.slot, hashes)

            def on_first_byte(b: Backend = backend) -> None:
                first_byte[0] = True
                self.metrics.child(self.metrics.ttfb, model).observe(time.perf_counter() - started)
                self.registry.answered(b)

            code = "error"
            try:
                resp, outcome = await forward(
                    self.pool,  # type: ignore[arg-type]
                    self._upstream_url(backend.url, request.path),
                    raw,
                    headers,
                    request,
                    resp_headers,
                    on_first_byte,
                )
                code = str(outcome.status)
                if outcome.died_mid_stream:
                    self.registry.record_failure(backend)
                    if self.health:
                        self.health.probe_soon()
                else:
                    self.registry.record_success(backend)
                return resp
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
                self.index.on_done(backend.slot, hashes)
                self.metrics.child(self.metrics.requests, model, backend.url, code).inc()
                if first_byte[0] or code != "error":
                    self.metrics.child(self.metrics.duration, model).observe(time.perf_counter() - started)
        if last is not None and last.status is not None:
            headers_out = {k: v for k, v in last.headers.items() if k in ("Content-Type", "Retry-After")}
            return web.Response(status=last.status, body=last.body, headers=headers_out)
        raise APIError(502, f"no replica of model {model!r} could answer: {last}", code="upstream_unavailable")

    def _upstream_url(self, base: str, path: str) -> URL:
        """Parsed once per (backend, path): URL parsing is a visible share of the per-request cost."""
        url = self._urls.get((base, path))
        if url is None:
            if len(self._urls) > 4096:
                self._urls.clear()
            url = self._urls[(base, path)] = URL(base + path)
        return url

    async def _pick(
        self, route: RouteRequest, hashes: list[int], tried: list[int], allow_wait: bool, observe: bool = True
    ) -> tuple[Backend | None, str]:
        """Choose a backend; wait in the bounded queue while none can take the request (first attempt only)."""

        def try_pick() -> tuple[Backend, str] | None:
            backends, _ = self.registry.routable(route.model, exclude=tried)
            if not backends:
                return None
            by_key = {b.url: b for b in backends}
            cands = []
            for b in backends:
                load = combined_load(b.in_flight, b.answering, b.waiting, b.engine_load)
                cands.append(
                    Candidate(
                        b.url,
                        in_flight=load.in_flight,
                        answering=load.answering,
                        waiting=load.waiting,
                        matched_blocks=self.index.match(b.slot, hashes) if hashes else 0,
                        footprint=self.index.footprint(b.slot),
                    )
                )
            decision = self.policy.choose(route, cands)
            if observe:
                self.metrics.child(self.metrics.decisions, self.policy.name.value, decision.reason).inc()
            if hashes and observe:
                self.metrics.match_ratio.observe(decision.matched_blocks / len(hashes))
            return by_key[decision.key], decision.reason

        if not allow_wait:
            picked = try_pick()
            return picked if picked else (None, "")
        return await self.queue.wait_for(route.model, try_pick)

    # --- app -------------------------------------------------------------------------------------
    def make_app(self) -> web.Application:
        app = web.Application(
            middlewares=[self.route_errors_middleware, self.auth_middleware], client_max_size=self.config.max_body_bytes
        )
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get("/v1/models", self.handle_models)
        app.router.add_get("/v1/models/{model:.+}", self.handle_model)  # names may hold slashes (org/model)
        app.router.add_get("/openapi.json", self.handle_openapi)
        for path in _ROUTED_PATHS:
            app.router.add_post(path, self.handle_inference)

        async def on_startup(_: web.Application) -> None:
            await self.start()

        async def on_cleanup(_: web.Application) -> None:
            await self.stop()

        app.on_startup.append(on_startup)
        app.on_cleanup.append(on_cleanup)
        return app


class ListenError(RuntimeError):
    """The router's port cannot be bound (usually: in use); the message names the address and the flag."""


class RouterServer:
    """Runs a Router on host:port; `async with RouterServer(cfg) as s: s.url`. As one of `--workers N` it listens
    with SO_REUSEPORT beside its siblings and answers their metrics requests on a unix socket."""

    def __init__(self, config: RouterConfig, worker: WorkerPlacement | None = None):
        self.config = config
        self.worker = worker
        self.router = Router(config, worker)
        self.runner: web.AppRunner | None = None
        self.local_runner: web.AppRunner | None = None
        self.port: int = config.port

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "") else self.config.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        self.runner = web.AppRunner(
            self.router.make_app(),
            handler_cancellation=True,
            access_log=None,
            max_field_size=self.config.max_header_bytes,
            max_line_size=self.config.max_header_bytes,
        )
        await self.runner.setup()
        site = web.TCPSite(
            self.runner,
            self.config.host,
            self.config.port,
            backlog=1024,
            reuse_address=True,
            reuse_port=self.worker is not None,
        )
        try:
            await site.start()
        except OSError as e:
            await self.runner.cleanup()
            raise ListenError(
                f"cannot listen on {self.config.host}:{self.config.port} ({os.strerror(e.errno) if e.errno else e}); "
                "choose another port with --port"
            ) from e
        sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
        if sockets:
            self.port = sockets[0].getsockname()[1]
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
        if self.local_runner:
            await self.local_runner.cleanup()
        if self.runner:
            await self.runner.cleanup()

    async def __aenter__(self) -> RouterServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
