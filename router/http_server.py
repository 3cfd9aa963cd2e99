"""A lean HTTP/1.1 server for the router: an asyncio.Protocol over httptools (llhttp, Node's parser) on uvloop.

aiohttp's server cost most of a routed request's CPU (a profile of the overhead run: request objects, header
multidicts, middleware chains, payload writers); the router needs far less of it. What it does:
- keep-alive (HTTP/1.1 default, HTTP/1.0 `Connection: keep-alive`) and pipelining: requests on one connection are
  answered one after another in order, reading pauses while more than a few wait;
- TCP_NODELAY on every accepted connection (no Nagle/delayed-ACK stall between a stream's small writes);
- plain responses in one write; streamed responses chunked (close-delimited to HTTP/1.0 clients), each piece
  written as the handler hands it over, waiting while the client's socket buffer is full;
- limits: a request line or header field over `max_header_bytes`, or all headers over 4x that (at least 64 KiB)
  -> 431; a body over `max_body_bytes` -> 413 (from Content-Length before reading, else while reading); malformed
  HTTP -> 400; errors in OpenAI's JSON shape (`error_body`); `Expect: 100-continue` answered;
- a client that disconnects cancels its handler (the router then aborts its upstream request);
- idle keep-alive connections close after `keepalive_timeout`; a request's head and body must arrive whole within
  `request_timeout` of its first byte plus 1/`min_upload_rate` s per body byte received (a total deadline: a client
  trickling a byte every few seconds does not extend it, a large upload at a steady pace is not cut), else 408 and
  close; a client that takes none of its answer for `request_timeout` is cut off;
- graceful stop: stop accepting, close idle connections, let requests in progress finish (bounded), then abort;
- eager start for the paths named in `eager_paths` (the router's routed POSTs): the handler runs at once, in the
  read callback that completed the request, up to its first await (for the router: until the request is written to
  a replica), and only then continues in a Task. A Task started the usual way first waits for its turn on the loop
  and costs its creation before the handler's first line; eager, both land after the upstream write, off the
  request's path. (Python 3.12's eager tasks do this natively; on 3.11 the coroutine is stepped by hand.)

The handler gets a `Request` (lower-case header names) and an `Exchange` to answer on.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Protocol

import httptools

log = logging.getLogger("kubellm.router.http")

ErrorBody = Callable[[int, str, str], bytes]  # (status, message, code) -> JSON body
Handler = Callable[["Request", "Exchange"], Awaitable[None]]

_MAX_PIPELINED = 16  # requests waiting on one connection before reading pauses
# After an error answer that closes a connection while the client may still be sending (408, 413, 431, 400), the
# server half-closes and reads and drops what comes for up to this long before closing (as nginx's lingering_close):
# a socket closed with unread bytes, or one that bytes still reach, answers with a RST, and the client's stack then
# drops the answer it has not read yet (the client sees ECONNRESET instead of the 408).
_LINGER_S = 2.0
_NATIVE_EAGER = sys.version_info >= (3, 12)
_STATUS_LINES: dict[tuple[int, bool], bytes] = {}
# header names and methods as the handler sees them, decoded (and lower-cased) once each instead of per request
_HEADER_NAMES: dict[bytes, str] = {}
_METHODS = {m.encode(): m for m in ("GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH")}


def _status_line(status: int, http10: bool = False) -> bytes:
    line = _STATUS_LINES.get((status, http10))
    if line is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Unknown"
        line = _STATUS_LINES[(status, http10)] = f"HTTP/1.{0 if http10 else 1} {status} {phrase}\r\n".encode()
    return line


class _Date:
    """The Date header, formatted once a second."""

    second = -1
    value = b""

    @classmethod
    def header(cls) -> bytes:
        now = int(time.time())
        if now != cls.second:
            cls.second, cls.value = now, f"Date: {formatdate(now, usegmt=True)}\r\n".encode()
        return cls.value


def default_error_body(status: int, message: str, code: str) -> bytes:
    import json

    err = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    return json.dumps({"error": err}).encode()


class Running(Protocol):
    """What the server keeps of a handler in progress: a Task, or (3.11, eager paths) a _Driver."""

    def done(self) -> bool: ...

    def cancel(self, msg: Any = None) -> bool: ...


class _Driver:
    """Carries on a coroutine that was stepped by hand up to its first suspension, without a Task (3.11): each future
    it awaits wakes it through a done callback, as a Task's step would, minus the Task itself (its creation, its
    registration in asyncio's task set, its first step on a later turn of the loop). No Task is current inside: what
    the handler awaits must not need one (`asyncio.timeout`, aiohttp's timeouts; 3.11's wait_for, shield, sleep and
    executors do not).

    Cancellation as a Task's: the awaited future is cancelled and the coroutine sees CancelledError there; if it was
    already done, a CancelledError replaces its result. Every step runs in `context`, the coroutine's own copy (as a
    Task's): what the handler sets in a ContextVar stays in it."""

    __slots__ = ("_cancel", "_done", "_waiter", "context", "coro", "loop")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        coro: Coroutine[object, None, None],
        waiting: object,
        context: contextvars.Context,
    ):
        self.loop, self.coro, self.context = loop, coro, context
        self._waiter: asyncio.Future[Any] | None = None
        self._done = False
        self._cancel = False
        self._wait_on(waiting)

    def __repr__(self) -> str:
        return f"<_Driver {getattr(self.coro, '__qualname__', self.coro)!s} {'done' if self._done else 'running'}>"

    def done(self) -> bool:
        return self._done

    def cancel(self, msg: Any = None) -> bool:
        if self._done:
            return False
        self._cancel = True
        if self._waiter is not None and self._waiter.cancel():
            self._cancel = False  # (the coroutine gets the future's CancelledError)
        return True

    def _wait_on(self, result: object) -> None:
        if result is None:  # a bare yield (asyncio.sleep(0)): carry on at the loop's next turn
            self.loop.call_soon(self._step, None, context=self.context)
        elif getattr(result, "_asyncio_future_blocking", None):
            fut: asyncio.Future[Any] = result  # type: ignore[assignment]
            fut._asyncio_future_blocking = False
            self._waiter = fut
            fut.add_done_callback(self._wakeup, context=self.context)
            if self._cancel and fut.cancel():
                self._cancel = False
        else:
            error = RuntimeError(f"a coroutine yielded {result!r}, not a future")
            self.loop.call_soon(self._step, error, context=self.context)

    def _wakeup(self, fut: asyncio.Future[Any]) -> None:
        self._waiter = None
        try:
            fut.result()
        except BaseException as e:  # (raised into the coroutine where it awaited, as a Task does)
            self._step(e)
        else:
            self._step(None)

    def _step(self, exc: BaseException | None) -> None:
        if self._done:
            return
        if self._cancel and not isinstance(exc, asyncio.CancelledError):
            exc = asyncio.CancelledError()
        self._cancel = False
        try:
            result = self.coro.send(None) if exc is None else self.coro.throw(exc)
        except (StopIteration, asyncio.CancelledError):
            self._done = True
            return
        except (KeyboardInterrupt, SystemExit):
            self._done = True
            raise
        except BaseException:  # (the server's _serve answers a handler's errors itself: this is a bug there)
            self._done = True
            log.exception("a handler driven without a Task failed")
            return
        self._wait_on(result)


def start_eager(loop: asyncio.AbstractEventLoop, coro: Coroutine[object, None, None]) -> Running | None:
    """Run `coro` now, in the caller's stack, up to its first suspension: None if it finished there, else what carries
    it on: a Task (3.12's eager tasks), or on 3.11 a _Driver, with no Task current at any point: what the coroutine
    awaits must not need one (`asyncio.timeout`, aiohttp's timeouts)."""
    if _NATIVE_EAGER:
        task = asyncio.Task(coro, loop=loop, eager_start=True)  # type: ignore[call-arg]
        return None if task.done() else task
    # Its first step in a copy of the caller's context, as a Task's: the read callback's context is the connection's,
    # reused for every read, so a ContextVar the handler set there would reach the next request on the connection.
    context = contextvars.copy_context()
    try:
        waiting = context.run(coro.send, None)
    except StopIteration:
        return None
    return _Driver(loop, coro, waiting, context)


class Request:
    __slots__ = ("body", "headers", "http10", "keep_alive", "method", "path", "query")

    def __init__(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes, keep_alive: bool, http10: bool
    ):
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers  # lower-case names; repeated headers joined with ", "
        self.body = body
        self.keep_alive = keep_alive
        self.http10 = http10


class Exchange:
    """The answer to one request: `respond(...)` once, or `start_stream(...)`, `await write(...)`..., `end_stream()`."""

    __slots__ = ("_chunked", "_conn", "_http10", "finished", "head_only", "keep_alive", "started", "status")

    def __init__(self, conn: _Connection, keep_alive: bool, http10: bool, head_only: bool):
        self._conn = conn
        self._http10 = http10
        self.keep_alive = keep_alive
        self.head_only = head_only
        self.started = False
        self.finished = False
        self.status = 0
        self._chunked = False

    def _head(self, status: int, headers: Iterable[tuple[str, str]], framing: bytes) -> bytearray:
        if self._conn.server.closing:
            self.keep_alive = False
        out = bytearray(_status_line(status, self._http10))
        for k, v in headers:
            out += f"{k}: {v}\r\n".encode("latin-1")
        out += _Date.header()
        out += framing
        if not self.keep_alive:
            out += b"Connection: close\r\n"
        elif self._http10:
            out += b"Connection: keep-alive\r\n"
        out += b"\r\n"
        return out

    def respond(self, status: int, body: bytes, headers: Iterable[tuple[str, str]] = ()) -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started = self.finished = True
        self.status = status
        if status == 204 or status == 304 or status < 200:  # no body, and no Content-Length (RFC 9110 8.6)
            self._conn.write(self._head(status, headers, b""))
            return
        out = self._head(status, headers, b"Content-Length: %d\r\n" % len(body))
        if not self.head_only:
            out += body
        self._conn.write(out)

    def start_stream(self, status: int, headers: Iterable[tuple[str, str]] = ()) -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        self.status = status
        if self._http10:  # no chunked encoding in HTTP/1.0: the body ends when the connection does
            self.keep_alive = False
            self._conn.write(self._head(status, headers, b""))
        else:
            self._chunked = True
            self._conn.write(self._head(status, headers, b"Transfer-Encoding: chunked\r\n"))

    async def write(self, data: bytes) -> None:
        """One piece of a streamed body, sent at once; raises ConnectionResetError if the client is gone."""
        if not data or self.head_only:
            return
        conn = self._conn
        if conn.lost:
            raise ConnectionResetError("the client closed the connection")
        conn.write(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)
        if conn.paused:
            await conn.drain()

    def end_stream(self) -> None:
        if not self.finished:
            self.finished = True
            if self._chunked and not self.head_only:
                self._conn.write(b"0\r\n\r\n")


class _Connection(asyncio.Protocol):
    def __init__(self, server: HTTPServer):
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.lost = False
        self.paused = False
        self._drain: asyncio.Future[None] | None = None
        self.queue: deque[Request] = deque()
        self.task: Running | None = None
        self.reading = True
        self.last_active = 0.0
        self.in_message = False  # between a request's first byte and its end
        self.message_started = 0.0  # (loop time) that first byte: the request must be in by request_timeout after
        self.refused = False  # an error answered: read nothing more
        self.eager_pending = False  # a request to start eagerly once the parser returns
        # the request being parsed
        self._url: bytes | bytearray = b""
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_len = 0

    # --- transport events ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass  # (a unix socket)
        self.last_active = self.loop.time()
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.server.connections.discard(self)
        self.queue.clear()
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the client went away: the handler stops (and aborts its upstream request)
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("the client closed the connection"))

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    async def drain(self) -> None:
        """Wait while the client's socket buffer is full; a client that takes nothing for `request_timeout` is cut
        off (its handler is cancelled and the router aborts the upstream request) instead of holding both forever."""
        if self.paused and not self.lost:
            if self._drain is None:
                self._drain = self.loop.create_future()
            stalled = self.loop.call_later(self.server.request_timeout, self._write_stalled)
            try:
                await self._drain
            finally:
                stalled.cancel()

    def _write_stalled(self) -> None:
        if self.paused and self.transport is not None:
            log.info("a client read nothing of its answer for %gs: closing it", self.server.request_timeout)
            self.transport.abort()

    def write(self, data: bytes | bytearray) -> None:
        if not self.lost and self.transport is not None:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        self.last_active = self.loop.time()
        try:
            self.parser.feed_data(data)
        except _Refused:
            pass
        except httptools.HttpParserUpgrade:
            self._refuse(400, "protocol upgrades are not supported", "bad_request")
        except httptools.HttpParserError as e:
            self._refuse(400, f"malformed HTTP request: {e}", "bad_request")
        if self.eager_pending:  # (outside the parser's callbacks: the handler may answer, close, or be refused)
            self.eager_pending = False
            try:
                self.task = start_eager(self.loop, self._serve())
            except Exception:  # (_serve answers handler errors itself; this is a bug in the server)
                log.exception("eager start failed")
                self._close()

    def eof_received(self) -> bool:
        return False  # a client that half-closes has gone (as aiohttp's server takes it): its handler is cancelled

    # --- parser callbacks ---------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.in_message = True
        self.message_started = self.loop.time()
        self._url = b""
        self._headers = {}
        self._header_bytes = 0
        self._body = []
        self._body_len = 0

    def on_url(self, url: bytes) -> None:
        if not self._url:
            self._url = url  # (the usual case: the whole request line in one piece, kept as it came)
        else:  # (a line in pieces: a bytearray, so a trickling client cannot make the concatenation quadratic)
            if type(self._url) is bytes:
                self._url = bytearray(self._url)
            self._url += url
        self._header_bytes += len(url)
        if len(self._url) > self.server.max_header_bytes:
            self._headers_too_large(f"the request line exceeds {self.server.max_header_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value)
        self._header_bytes += size + 4
        if size > self.server.max_header_bytes:
            self._headers_too_large(f"a header field exceeds {self.server.max_header_bytes} bytes")
        if self._header_bytes > self.server.max_head_bytes:
            self._headers_too_large(f"the request's headers exceed {self.server.max_head_bytes} bytes in all")
        key = _HEADER_NAMES.get(name)
        if key is None:
            key = name.decode("latin-1").lower()
            if len(_HEADER_NAMES) < 512:  # (the names clients send: a few dozen; never unbounded)
                _HEADER_NAMES[name] = key
        text = value.decode("latin-1")
        old = self._headers.get(key)
        self._headers[key] = text if old is None else f"{old}, {text}"

    def _headers_too_large(self, message: str) -> None:
        self._refuse(431, message, "headers_too_large")
        raise _Refused

    def on_headers_complete(self) -> None:
        length = self._headers.get("content-length")
        limit = self.server.max_body_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            self._refuse(413, f"request body exceeds {limit} bytes", "body_too_large")
            raise _Refused
        if (
            self._headers.get("expect", "").lower() == "100-continue"
            and self.task is None  # (with an answer in progress the interim line would land inside it: a client
            and not self.queue  # that pipelines sends its body without waiting for one)
            and self.parser.get_http_version() != "1.0"  # (never to HTTP/1.0 clients, RFC 9110 10.1.1)
        ):
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_len += len(body)
        if self._body_len > self.server.max_body_bytes:
            self._refuse(413, f"request body exceeds {self.server.max_body_bytes} bytes", "body_too_large")
            raise _Refused
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        parser = self.parser
        path, _, query = self._url.partition(b"?")
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        method = parser.get_method()
        req = Request(
            _METHODS.get(method) or method.decode("latin-1"),
            path.decode("latin-1"),
            query.decode("latin-1") if query else "",
            self._headers,
            body,
            parser.should_keep_alive(),
            parser.get_http_version() == "1.0",
        )
        self.queue.append(req)
        if self.task is None and not self.eager_pending:
            if req.path in self.server.eager_paths and len(self.queue) == 1:
                self.eager_pending = True
            else:
                self.task = self.loop.create_task(self._serve())
        elif len(self.queue) > _MAX_PIPELINED and self.reading and self.transport is not None:
            self.reading = False
            self.transport.pause_reading()

    # --- answering ----------------------------------------------------------------------------------
    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answer an unreadable request with an error (after any answers in progress) and close. Parser callbacks
        raise _Refused after it, which stops the parser."""
        if self.refused:
            return
        self.refused = True
        body = self.server.error_body(status, message, code)
        head = _status_line(
            status
        ) + b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        if self.task is None and not self.eager_pending:  # nothing in progress: answer now
            self.write(head + body)
            self._linger_close()
        else:
            self.queue.append(_RefusedRequest(head + body))  # type: ignore[arg-type]

    async def _serve(self) -> None:
        server = self.server
        try:
            while self.queue and not self.lost:
                req = self.queue.popleft()
                if isinstance(req, _RefusedRequest):
                    self.write(req.answer)
                    self._linger_close()
                    return
                if not self.reading and len(self.queue) <= _MAX_PIPELINED // 2 and self.transport is not None:
                    self.reading = True
                    self.transport.resume_reading()
                head_only = req.method == "HEAD"
                ex = Exchange(self, req.keep_alive and not server.closing, req.http10, head_only)
                try:
                    await server.handler(req, ex)
                except (ConnectionResetError, BrokenPipeError):
                    self._close()
                    return
                except Exception:
                    log.exception("handler failed on %s %s", req.method, req.path)
                    self._fail(ex, "internal server error")
                    return
                if not ex.finished:
                    self._fail(ex, "the handler gave no answer")
                    return
                if not ex.keep_alive:
                    self._close()
                    return
                self.last_active = self.loop.time()
        finally:
            self.task = None
        if server.closing and not self.in_message:
            self._close()

    def _fail(self, ex: Exchange, message: str) -> None:
        """A handler that raised or left its answer unfinished: a 500 if nothing was sent yet, then close (a
        stream cut short ends without its last chunk, which the client sees as an error)."""
        if not ex.started:
            body = self.server.error_body(500, message, "internal_error")
            ex.keep_alive = False
            ex.respond(500, body, (("Content-Type", "application/json"),))
        self._close()

    def _close(self) -> None:
        self.queue.clear()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _linger_close(self) -> None:
        """Close after a refusal's answer without a RST (_LINGER_S): FIN after the answer, then what the client still
        sends is read and dropped (data_received, refused) until it closes its side or _LINGER_S pass."""
        self.queue.clear()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not transport.can_write_eof():
            transport.close()
            return
        if not self.reading:
            self.reading = True
            transport.resume_reading()
        transport.write_eof()
        self.loop.call_later(_LINGER_S, self._close)

    def idle(self) -> bool:
        if self.refused and self.task is None and not self.queue:
            return True  # (a refused request's answer is out: only its lingering close is left)
        return self.task is None and not self.queue and not self.in_message and not self.eager_pending


class _Refused(Exception):
    """Raised inside parser callbacks to stop parsing a refused request."""


class _RefusedRequest:
    __slots__ = ("answer",)

    def __init__(self, answer: bytes):
        self.answer = answer


class HTTPServer:
    def __init__(
        self,
        handler: Handler,
        *,
        max_body_bytes: int,
        max_header_bytes: int,
        error_body: ErrorBody = default_error_body,
        keepalive_timeout: float = 75.0,
        request_timeout: float = 60.0,
        min_upload_rate: float = 64 * 1024,
        eager_paths: Iterable[str] = (),
    ):
        self.handler = handler
        self.eager_paths = frozenset(eager_paths)  # handlers started at once (see the module's docstring)
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes  # the request line, and each header field (name + value)
        self.max_head_bytes = max(65536, 4 * max_header_bytes)  # all of them together
        self.error_body = error_body
        self.keepalive_timeout = keepalive_timeout
        self.request_timeout = request_timeout
        # bytes/s: each byte of body received moves the request's deadline on by 1/min_upload_rate s, so a large
        # upload at a legitimate pace is not cut at request_timeout, while a trickle gains next to nothing (the
        # longest a request can take stays bounded: request_timeout + max_body_bytes / min_upload_rate)
        if not min_upload_rate > 0:
            raise ValueError(f"min_upload_rate must be > 0 bytes/s, got {min_upload_rate!r}")
        self.min_upload_rate = min_upload_rate
        self.connections: set[_Connection] = set()
        self.closing = False
        self.loop = asyncio.get_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def listen(self, host: str, port: int, *, reuse_port: bool = False, backlog: int = 1024) -> int:
        """Start accepting on host:port (0: any free port); returns the port."""
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(
            lambda: _Connection(self),
            host or None,
            port,
            backlog=backlog,
            reuse_address=True,
            reuse_port=reuse_port or None,
        )
        self._sweeper = self.loop.create_task(self._sweep())
        return int(self._server.sockets[0].getsockname()[1])

    async def _sweep(self) -> None:
        """Close keep-alive connections idle too long; answer 408 to requests not in whole by their deadline."""
        period = max(0.05, min(self.keepalive_timeout, self.request_timeout) / 4)
        while True:
            await asyncio.sleep(period)
            self.sweep_once(self.loop.time())

    def sweep_once(self, now: float) -> None:
        for c in list(self.connections):
            if c.task is not None or c.queue or c.eager_pending or c.refused:
                continue  # (a request still being answered: the next one's deadline is checked after it)
            if c.in_message:
                if now - c.message_started > self.request_timeout + c._body_len / self.min_upload_rate:
                    message = f"the request was not received in whole within {self.request_timeout:g}s"
                    c._refuse(408, message, "request_timeout")
            elif now - c.last_active > self.keepalive_timeout:
                c._close()

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting; close idle connections; wait (bounded) for requests in progress; abort what is left."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for c in list(self.connections):
            if c.idle():
                c._close()
        deadline = self.loop.time() + timeout
        while any(not c.idle() for c in self.connections) and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        for c in list(self.connections):
            if c.task is not None:
                c.task.cancel()
            if c.transport is not None:
                c.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
