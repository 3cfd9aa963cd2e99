"""aiohttp routes and the process lifecycle of `kubellm serve`.

Lifecycle, shaped for Kubernetes: the port opens at once and /health answers 503 while the model loads (a
startup probe can wait on it); 200 once the engine is ready; on SIGTERM /health turns 503 first, new
generation requests get 503 (a router retries them elsewhere), in-flight requests may finish within the
grace period, the rest end with finish_reason "abort", and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from kubellm import __version__
from kubellm.openai_errors import APIError, check_json_content_type, model_not_found, route_error
from kubellm.openai_protocol import ModelCard, ModelList

from .async_engine import _END, AsyncEngine, KVSubscription
from .chat_tools import ChatParsingConfig
from .errors import bad_request, error_response, from_validation_error, keys_match, logger
from .metrics import CONTENT_TYPE, ServerMetrics
from .openapi import build_openapi
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    UnsupportedField,
    VersionResponse,
)
from .serving import OpenAIServing

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
UNPROTECTED = {"/health", "/metrics", "/version", "/openapi.json", "/ping"}


@dataclass
class ServerSettings:
    host: str = "0.0.0.0"
    port: int = 8000
    served_model_names: list[str] = field(default_factory=list)
    model_path: str | None = None
    api_key: str | None = None
    max_request_body_bytes: int = 8 * 1024 * 1024
    shutdown_grace_period: float = 30.0
    retry_after_s: int = 1
    max_logprobs: int = 20
    access_log: bool = False
    chat_parsing: ChatParsingConfig = field(default_factory=ChatParsingConfig)


@dataclass
class ServerState:
    draining: bool = False
    kv_subscriptions: set[KVSubscription] = field(default_factory=set)


ENGINE_KEY = web.AppKey("async_engine", AsyncEngine)
SERVING_KEY = web.AppKey("serving", OpenAIServing)
METRICS_KEY = web.AppKey("metrics", ServerMetrics)
SETTINGS_KEY = web.AppKey("settings", ServerSettings)
STATE_KEY = web.AppKey("state", ServerState)
REQUEST_ID_KEY = web.RequestKey("request_id", str)


# ---- middlewares ----


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    """Every failure becomes OpenAI's error JSON; nothing a client sends can produce a traceback."""
    try:
        return await handler(request)
    except APIError as e:
        return error_response(e)
    except UnsupportedField as e:
        return error_response(APIError(400, str(e), e.field, "unsupported_parameter"))
    except ValidationError as e:
        return error_response(from_validation_error(e))
    except web.HTTPRequestEntityTooLarge as e:
        return error_response(
            APIError(413, f"request body too large: {e.text or 'over the limit'}", code="request_too_large")
        )
    except web.HTTPException as e:
        if e.status < 400:
            raise
        if e.status in (404, 405):
            return error_response(route_error(e.status, request.method, request.path, e.headers.get("Allow")))
        return error_response(APIError(e.status, e.reason))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        logger.exception("internal error on %s %s", request.method, request.path)
        return error_response(APIError(500, "internal server error", code="internal_error"))


@web.middleware
async def _request_id_and_auth(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    given = request.headers.get("X-Request-Id", "")
    request[REQUEST_ID_KEY] = given if REQUEST_ID_RE.match(given) else uuid.uuid4().hex
    settings = request.app[SETTINGS_KEY]
    if settings.api_key and request.path not in UNPROTECTED:
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not keys_match(token.strip(), settings.api_key):
            raise APIError(
                401,
                "Incorrect or missing API key; send it as `Authorization: Bearer <key>`.",
                code="invalid_api_key",
            )
    return await handler(request)


async def _echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: reaches streamed responses too, whose headers leave before a middleware returns."""
    rid = request.get(REQUEST_ID_KEY)
    if rid:
        response.headers["X-Request-Id"] = rid


# ---- helpers ----


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: web.Request) -> dict[str, Any]:
    check_json_content_type(request.headers.get("Content-Type"))
    raw = await request.read()
    if not raw:
        raise bad_request("the request body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not valid UTF-8 (byte {e.start})") from e
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError, RecursionError) as e:
        raise bad_request(f"malformed JSON in the request body: {e}", code="invalid_json") from e
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def _json(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(status=status, text=model.model_dump_json(), content_type="application/json")


def _ready_serving(request: web.Request) -> OpenAIServing:
    engine = request.app[ENGINE_KEY]
    if engine.dead is not None:
        raise APIError(503, "the engine has failed; this replica is restarting", code="engine_dead")
    if not engine.ready:
        raise APIError(503, "the model is still loading; retry shortly", code="not_ready", headers={"Retry-After": "2"})
    return request.app[SERVING_KEY]


def _admit(request: web.Request) -> OpenAIServing:
    """Gate for new generation work: ready, not draining, waiting queue not full."""
    serving = _ready_serving(request)
    settings = request.app[SETTINGS_KEY]
    retry = {"Retry-After": str(settings.retry_after_s)}
    if request.app[STATE_KEY].draining:
        raise APIError(503, "this replica is shutting down; retry on another", code="draining", headers=retry)
    engine = request.app[ENGINE_KEY]
    if engine.queue_full():
        raise APIError(
            429,
            f"too many requests waiting ({engine.waiting_estimate()} >= {engine.max_waiting_requests}); retry later",
            code="queue_full",
            headers=retry,
        )
    return serving


async def _stream(request: web.Request, chunks: AsyncIterator[bytes], content_type: str) -> web.StreamResponse:
    """Writes chunks as they come. The first chunk is awaited before headers go out, so an engine refusal
    still becomes an HTTP error; a client that goes away ends the generator, whose cleanup aborts the request."""
    try:
        try:
            first: bytes | None = await chunks.__anext__()
        except StopAsyncIteration:
            first = None
        resp = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
        await resp.prepare(request)
        if first is not None:
            await resp.write(first)
            async for chunk in chunks:
                await resp.write(chunk)
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp
    except ConnectionError:  # client gone mid-stream; cleanup below aborts the engine request
        return web.Response(status=499)
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


# ---- handlers ----


async def health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    if request.app[STATE_KEY].draining:
        return web.json_response({"status": "draining"}, status=503)
    if not engine.ready:
        return web.json_response({"status": "dead" if engine.dead else "loading"}, status=503)
    return web.json_response({"status": "ok"})


async def version(request: web.Request) -> web.Response:
    return _json(VersionResponse(version=__version__))


async def models(request: web.Request) -> web.Response:
    serving = _ready_serving(request)
    settings = request.app[SETTINGS_KEY]
    cards = [
        ModelCard(id=name, root=settings.model_path, max_model_len=serving.engine.max_model_len)
        for name in settings.served_model_names
    ]
    return _json(ModelList(data=cards))


async def model(request: web.Request) -> web.Response:
    """GET /v1/models/{model}: one card, or OpenAI's 404 for a name this replica does not serve."""
    serving = _ready_serving(request)
    settings = request.app[SETTINGS_KEY]
    name = request.match_info["model"]
    if name not in settings.served_model_names:
        raise model_not_found(name)
    return _json(ModelCard(id=name, root=settings.model_path, max_model_len=serving.engine.max_model_len))


async def completions(request: web.Request) -> web.StreamResponse:
    serving = _admit(request)
    req = CompletionRequest.model_validate(await read_json(request))
    rid = request[REQUEST_ID_KEY]
    if req.stream:
        return await _stream(request, await serving.completion_stream(req, rid), "text/event-stream")
    return _json(await serving.completion(req, rid))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    serving = _admit(request)
    req = ChatCompletionRequest.model_validate(await read_json(request))
    rid = request[REQUEST_ID_KEY]
    if req.stream:
        return await _stream(request, await serving.chat_stream(req, rid), "text/event-stream")
    return _json(await serving.chat(req, rid))


async def tokenize(request: web.Request) -> web.Response:
    serving = _ready_serving(request)
    req = TokenizeRequest.model_validate(await read_json(request))
    serving.check_model(req.model)
    renderer = serving.engine.renderer
    if req.messages is not None:
        text = serving.render_chat(req, req.add_generation_prompt)
        ids = renderer.encode(text, add_special_tokens=False)
    else:
        ids = renderer.encode(req.prompt or "", add_special_tokens=req.add_special_tokens)
    strs = [renderer.tokenizer.id_to_token(t) or "" for t in ids] if req.return_token_strs else None
    return _json(
        TokenizeResponse(count=len(ids), max_model_len=serving.engine.max_model_len, tokens=ids, token_strs=strs)
    )


async def detokenize(request: web.Request) -> web.Response:
    serving = _ready_serving(request)
    req = DetokenizeRequest.model_validate(await read_json(request))
    serving.check_model(req.model)
    serving._check_token_ids(req.tokens, "tokens")
    return _json(DetokenizeResponse(prompt=serving.engine.renderer.decode(req.tokens, skip_special_tokens=False)))


async def tokenizer_info(request: web.Request) -> web.Response:
    serving = _ready_serving(request)
    return _json(serving.engine.tokenizer_info)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def kv_events(request: web.Request) -> web.StreamResponse:
    """NDJSON: a snapshot of every cached block, then numbered stored/removed/cleared events."""
    _ready_serving(request)
    engine = request.app[ENGINE_KEY]
    state = request.app[STATE_KEY]
    if state.draining:
        raise APIError(503, "this replica is shutting down", code="draining")
    sub = await engine.subscribe_kv_events()
    state.kv_subscriptions.add(sub)
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"})
    try:
        await resp.prepare(request)
        async for line in sub.lines():
            await resp.write(line)
    except ConnectionError:
        pass
    finally:
        state.kv_subscriptions.discard(sub)
        engine.unsubscribe_kv_events(sub)
    return resp


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(build_openapi(__version__))


def build_app(async_engine: AsyncEngine, metrics_: ServerMetrics, settings: ServerSettings) -> web.Application:
    app = web.Application(middlewares=[_errors, _request_id_and_auth], client_max_size=settings.max_request_body_bytes)
    app[ENGINE_KEY] = async_engine
    app[SERVING_KEY] = OpenAIServing(
        async_engine, settings.served_model_names, settings.max_logprobs, settings.chat_parsing
    )
    app[SERVING_KEY].on_constrained_request = metrics_.on_constrained_request
    app[METRICS_KEY] = metrics_
    app[SETTINGS_KEY] = settings
    app[STATE_KEY] = ServerState()
    app.on_response_prepare.append(_echo_request_id)
    app.router.add_get("/health", health)
    app.router.add_get("/ping", health)
    app.router.add_get("/version", version)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", model)  # names may hold slashes (org/model)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/v1/tokenizer_info", tokenizer_info)
    app.router.add_get("/v1/kv_events", kv_events)
    return app


def cache_info(engine: Any) -> dict[str, str]:
    cfg = engine.config
    stats = engine.stats()
    return {
        "block_size": str(cfg.block_size),
        "num_gpu_blocks": str(getattr(stats, "blocks_total", "")),
        "enable_prefix_caching": str(cfg.enable_prefix_caching),
        "gpu_memory_utilization": str(cfg.gpu_memory_utilization),
        "cache_dtype": "fp8" if cfg.kv_cache_dtype in ("fp8", "fp8_e4m3") else "auto",
    }


@dataclass
class Server:
    """One engine + HTTP server, startable in-process (tests) or from the CLI."""

    engine_factory: Callable[[], Any]
    settings: ServerSettings
    max_waiting_requests: int | None = None
    app: web.Application = field(init=False)
    async_engine: AsyncEngine = field(init=False)
    runner: web.AppRunner | None = field(init=False, default=None)
    port: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._cache_info: dict[str, str] = {}
        self.metrics = ServerMetrics(
            self.settings.served_model_names[0], lambda: self.async_engine.stats, self._cache_info
        )
        self.async_engine = AsyncEngine(
            self.engine_factory,
            max_waiting_requests=self.max_waiting_requests,
            on_output=self.metrics.observe,
            on_abort=self.metrics.on_abort,
            on_step=self.metrics.observe_step,
        )
        self.app = build_app(self.async_engine, self.metrics, self.settings)

    @property
    def state(self) -> ServerState:
        return self.app[STATE_KEY]

    async def start_http(self) -> None:
        self.runner = web.AppRunner(
            self.app,
            handler_cancellation=True,  # a client disconnect cancels its handler, which aborts the request
            shutdown_timeout=5.0,
            access_log=logging.getLogger("kubellm.access") if self.settings.access_log else None,
        )
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.settings.host, self.settings.port, reuse_address=True)
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.settings.port

    async def start_engine(self) -> None:
        await self.async_engine.start()
        self._cache_info.update(cache_info(self.async_engine.engine))
        grammars = getattr(self.async_engine.engine, "structured_outputs", None)
        if grammars is not None:
            grammars.on_compile = self.metrics.grammar_compile.observe

    async def start(self) -> None:
        await self.start_http()
        await self.start_engine()

    async def drain(self, grace_period: float | None = None) -> None:
        """Health fails, new work is refused, in-flight requests get `grace_period` seconds to finish."""
        state = self.state
        state.draining = True
        for sub in list(state.kv_subscriptions):
            AsyncEngine._deliver_kv(sub, _END)
        grace = self.settings.shutdown_grace_period if grace_period is None else grace_period
        deadline = time.monotonic() + grace
        while self.async_engine.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.async_engine.num_in_flight:
            logger.warning("grace period over: aborting %d request(s)", self.async_engine.num_in_flight)
            self.async_engine.abort_all()
            end = time.monotonic() + 5.0
            while self.async_engine.num_in_flight and time.monotonic() < end:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.05)  # let handlers write their final chunks

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        await self.async_engine.shutdown()


async def serve(server: Server) -> int:
    """Runs until SIGTERM/SIGINT, then drains and exits 0 (1 when the engine could not start)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await server.start_http()
    except OSError as e:  # a port in use is a user's everyday mistake: one line, no traceback
        logger.error(
            "cannot listen on %s:%d (%s); choose another port with --port",
            server.settings.host, server.settings.port, os.strerror(e.errno) if e.errno else e,
        )  # fmt: skip
        await server.stop()
        return 1
    logger.info("listening on http://%s:%d (loading the model)", server.settings.host, server.port)
    engine_task = asyncio.ensure_future(server.start_engine())
    stop_task = asyncio.ensure_future(stop.wait())
    await asyncio.wait({engine_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    if engine_task.done() and engine_task.exception() is not None:
        e = engine_task.exception()
        logger.error("the engine failed to start: %s", e)
        stop_task.cancel()
        await server.stop()
        return 1
    if not stop.is_set():
        eng = server.async_engine.engine
        logger.info(
            "ready: model %s (max_model_len %s) at http://%s:%d/v1",
            server.settings.served_model_names[0],
            eng.max_model_len,
            server.settings.host,
            server.port,
        )
        await stop_task
    else:
        engine_task.cancel()
    logger.info("shutting down: draining in-flight requests (grace %.0fs)", server.settings.shutdown_grace_period)
    await server.drain()
    await server.stop()
    logger.info("stopped")
    return 0
