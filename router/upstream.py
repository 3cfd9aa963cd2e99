"""A lean HTTP/1.1 client for the router's one hot upstream call: POST a body to a replica, read the answer back.

aiohttp's client costs a quarter of a routed request's CPU (request objects, header multidicts, payload wrappers,
stream readers); the router needs little of it: one method, bodies it already holds as bytes, kept-alive
connections per replica, Content-Length or chunked answers read as they arrive, TCP_NODELAY. Health probes, KV
events and tokenizer fetches keep using aiohttp.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable

# Body bytes a response holds for its reader before the replica's socket stops being read (and resumes below the
# low mark): a client slower than its replica leaves the rest in the kernel's buffers and TCP's window, not here.
_BUFFER_HIGH = 1 << 20
_BUFFER_LOW = 1 << 18

log = logging.getLogger("kubellm.router.upstream")


class UpstreamError(Exception):
    """The replica could not be reached (connect=True) or the exchange broke."""

    def __init__(self, message: str, connect: bool = False):
        super().__init__(message)
        self.connect = connect


class _Connection(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool, key: tuple[str, int, bool], loop: asyncio.AbstractEventLoop):
        self.pool, self.key = pool, key
        # the loop that serves this connection, kept: on 3.11 every asyncio.get_running_loop() is a getpid()
        # system call (its fork check), once per routed request on the wait below
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.response: UpstreamResponse | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.response is not None:
            self.response._feed(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.response is not None:
            self.response._lost(exc)


class UpstreamResponse:
    """One response: `status` and `headers` (lower-case names) once `start` returns, then the body."""

    # Immutable starting values live on the class (one response per routed request: each attribute set in __init__
    # was a visible share of its construction); an instance gets its own once one changes.
    _buffered = 0  # bytes in _chunks
    _paused = False  # the replica's socket is not being read (_buffered over _BUFFER_HIGH)
    _waiter: asyncio.Future[None] | None = None
    _error: BaseException | None = None
    _head_done = False
    _length: int | None = None  # bytes of body left (Content-Length framing)
    _chunked = False
    _chunk_left = 0  # bytes left in the current chunk (+2 for its CRLF once started)
    _until_close = False
    done = False  # the whole body arrived
    deadline = 0.0  # (loop time) while waiting for data: when to give up
    status = 0
    _keep_alive = True
    delivered = False
    received = False  # any byte of the answer arrived

    def __init__(
        self,
        conn: _Connection,
        read_timeout: float,
        on_complete: Callable[[UpstreamResponse], bool] | None = None,
    ):
        self._conn = conn
        self._read_timeout = read_timeout
        self._buf = bytearray()
        self._chunks: deque[bytes] = deque()
        self.headers: dict[str, str] = {}
        # called (once) from the read callback when the whole answer is in, before the reader is woken: True if it
        # took the answer (the router's proxy writes a plain answer to its client right there, one loop hop sooner)
        self.on_complete = on_complete

    # --- fed by the protocol -----------------------------------------------------------------------
    def _push(self, piece: bytes) -> None:
        self._chunks.append(piece)
        self._buffered += len(piece)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _lost(self, exc: Exception | None) -> None:
        if self._until_close and self._head_done:
            if self._buf:
                self._push(bytes(self._buf))
                self._buf.clear()
            self.done = True
        elif not self.done:
            self._error = UpstreamError(f"replica closed the connection{': ' + str(exc) if exc else ''}")
        self._wake()

    def _feed(self, data: bytes) -> None:
        self.received = True
        self._buf += data
        try:
            if not self._head_done and not self._parse_head():
                return
            self._parse_body()
            if self._buffered > _BUFFER_HIGH and not self._paused and self._conn.transport is not None:
                self._paused = True
                self._conn.transport.pause_reading()
        except (ValueError, IndexError) as e:
            self._error = UpstreamError(f"malformed response from replica: {e}")
            self._conn.closed = True
            if self._conn.transport is not None:
                self._conn.transport.abort()
        else:
            if self.done and self.on_complete is not None:
                deliver, self.on_complete = self.on_complete, None
                try:
                    self.delivered = deliver(self)
                except Exception:  # (a bug in the callback: the reader still gets the answer the usual way)
                    log.exception("on_complete failed")
        self._wake()

    def _parse_head(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > 65536:
                raise ValueError("response headers too long")
            return False
        lines = self._buf[:end].decode("latin-1").split("\r\n")
        del self._buf[: end + 4]
        version, _, rest = lines[0].partition(" ")
        self.status = int(rest.partition(" ")[0])
        headers = self.headers
        for i in range(1, len(lines)):
            name, _, value = lines[i].partition(":")
            headers[name.strip().lower()] = value.strip()
        conn = headers.get("connection")
        if conn is None:
            self._keep_alive = version != "HTTP/1.0"
        else:
            conn = conn.lower()
            self._keep_alive = "close" not in conn and (version != "HTTP/1.0" or "keep-alive" in conn)
        te = headers.get("transfer-encoding")
        length = headers.get("content-length")
        if te is not None and "chunked" in te.lower():
            self._chunked = True
        elif length is not None:
            self._length = int(length)
        elif self.status in (204, 304) or 100 <= self.status < 200:
            self._length = 0
        else:
            self._until_close, self._keep_alive = True, False
        self._head_done = True
        return True

    def _parse_body(self) -> None:
        buf = self._buf
        if self._length is not None:
            take = min(self._length, len(buf))
            if take:
                self._push(bytes(buf[:take]))
                del buf[:take]
                self._length -= take
            if self._length == 0:
                self.done = True
            return
        if self._until_close:
            if buf:
                self._push(bytes(buf))
                buf.clear()
            return
        while buf:  # chunked
            if self._chunk_left == 0:
                nl = buf.find(b"\r\n")
                if nl < 0:
                    return
                size = int(bytes(buf[:nl]).split(b";", 1)[0].strip(), 16)
                del buf[: nl + 2]
                if size == 0:  # last chunk; trailers (none expected) end with an empty line
                    end = buf.find(b"\r\n")
                    if end < 0:
                        self._chunk_left = -1  # wait for the final CRLF
                        return
                    del buf[: end + 2]
                    self.done = True
                    return
                self._chunk_left = size + 2
            elif self._chunk_left == -1:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[: end + 2]
                self.done = True
                return
            data_left = self._chunk_left - 2
            if data_left > 0:
                take = min(data_left, len(buf))
                self._push(bytes(buf[:take]))
                del buf[:take]
                self._chunk_left -= take
            if self._chunk_left <= 2:
                if len(buf) < self._chunk_left:
                    return
                del buf[: self._chunk_left]  # the chunk's CRLF
                self._chunk_left = 0

    # --- read by the proxy --------------------------------------------------------------------------
    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        pool = self._conn.pool
        loop = self._conn.loop
        self._waiter = loop.create_future()
        self.deadline = loop.time() + self._read_timeout  # the pool's sweeper enforces it (no timer per wait)
        pool._waiting.add(self)
        if pool._sweeper is None:
            pool._start_sweeper(loop)
        try:
            await self._waiter
        finally:
            pool._waiting.discard(self)
            self._waiter = None
        if self._error is not None:
            raise self._error

    def _timeout(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError(f"no data from the replica for {self._read_timeout:g}s"))

    async def readany(self) -> bytes:
        """The next piece of the body as it arrived (chunk framing removed); b"" at its end."""
        self.on_complete = None  # the reader takes the body from here on (on_complete would see only the rest)
        while not self._chunks:
            if self.done:
                self._finish()
                return b""
            await self._wait()
        piece = self._chunks.popleft()
        self._buffered -= len(piece)
        if self._paused and self._buffered <= _BUFFER_LOW:
            self._resume()
        return piece

    def _resume(self) -> None:
        self._paused = False
        transport = self._conn.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def take_body(self) -> bytes:
        """The whole body, once `done` (on_complete's callers): what arrived, taken out."""
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0  # (a paused connection is read again when it goes back to the pool: _finish)
        return data

    async def read(self) -> bytes:
        out = bytearray()
        while piece := await self.readany():
            out += piece
        return bytes(out)

    def _finish(self) -> None:
        conn = self._conn
        conn.response = None
        if self._paused:  # (a pooled connection must be read again)
            self._resume()
        if self._keep_alive and not conn.closed and not self._buf:
            conn.pool._release(conn)
        elif conn.transport is not None:
            conn.transport.close()

    def close(self) -> None:
        """After the body was read: the connection goes back to the pool; before: it is aborted (the replica sees
        the disconnect and aborts the request)."""
        if self.done and not self._chunks:
            if self._conn.response is self:
                self._finish()
            return
        self._conn.response = None
        self._conn.closed = True
        if self._conn.transport is not None:
            self._conn.transport.abort()


def stale(resp: UpstreamResponse) -> bool:
    """A failed exchange that may be sent again on a new connection: the connection ended (closed, reset, or the
    write failed) before a single byte of the answer arrived. Only meaningful on a REUSED connection, where an
    end with no answer is what a replica closing its idle keep-alive connection looks like; on a new connection it
    is a replica failing. A POST is not idempotent in general (RFC 9112 9.3.1), but a completion changes nothing on
    the replica that outlives its connection (a replica that loses the connection aborts the request), so sending
    it once more is safe while no answer came back. Never after any byte of the answer: the replica was
    processing the request, and part of it may already be on its way to the client."""
    return not resp.received and resp._error is not None


class UpstreamPool:
    """Kept-alive connections per (host, port)."""

    def __init__(
        self,
        connect_timeout: float,
        read_timeout: float,
        max_idle_per_replica: int = 256,
        ssl_context: ssl.SSLContext | None = None,
        stale_window: float = 1.0,
    ):
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle_per_replica
        self._ssl_context = ssl_context  # for https:// replicas (default: the system's trust store, verified)
        self._idle: dict[tuple[str, int, bool], list[_Connection]] = {}
        self._waiting: set[UpstreamResponse] = set()  # responses waiting for data, each with its deadline
        self._sweeper: asyncio.Task[None] | None = None
        self.stale_retries = 0  # requests resent on a new connection after a pooled one turned out closed
        # seconds after the write within which a reused connection's end counts as the replica's idle close crossing
        # it (that end comes one round trip after the write); a later end with no answer is a replica that took the
        # request and failed while processing it (a crash, a kill): not resent, it may be what brought it down
        self.stale_window = stale_window

    def _start_sweeper(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweeper = loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        """Fail waits past their read timeout; checked a few times per timeout (at least once a second)."""
        period = min(1.0, self.read_timeout / 4)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            for resp in [r for r in self._waiting if r.deadline <= now]:
                resp._timeout()

    def _release(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) < self.max_idle:
            idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()

    def _idle_connection(self, key: tuple[str, int, bool]) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def _open(self, key: tuple[str, int, bool]) -> _Connection:
        loop = asyncio.get_running_loop()
        tls: ssl.SSLContext | None = None
        if key[2]:
            if self._ssl_context is None:
                self._ssl_context = ssl.create_default_context()
            tls = self._ssl_context
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self, key, loop), key[0], key[1], ssl=tls),
                self.connect_timeout,
            )
        except (OSError, TimeoutError) as e:  # (ssl.SSLError is an OSError: a certificate refused)
            raise UpstreamError(f"connect to {key[0]}:{key[1]} failed: {e!r}", connect=True) from e
        return conn

    async def post(
        self, host: str, port: int, path: str, headers: dict[str, str] | bytes, body: bytes, tls: bool = False
    ) -> UpstreamResponse:
        """POST body to host:port/path. headers: a dict, or header lines already rendered (b"Name: value\\r\\n"...)."""
        if not isinstance(headers, bytes):
            headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")
        start = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n".encode("latin-1")
        return await self.send(start, headers, body, (host, port, tls))

    async def send(
        self,
        start: bytes,
        headers: bytes,
        body: bytes,
        key: tuple[str, int, bool],
        on_sent: Callable[[], None] | None = None,
        on_complete: Callable[[UpstreamResponse], bool] | None = None,
    ) -> UpstreamResponse:
        """The hot path: `start` is the request line and Host header, `headers` further header lines, both
        rendered by the caller (once per replica and path, and once per request). `on_sent` runs right after the
        request is written to a kept-alive connection, or before a new connection is opened: either way before
        this coroutine first yields to the loop. `on_complete`: see UpstreamResponse.on_complete."""
        request = b"%bContent-Length: %d\r\n%b\r\n%b" % (start, len(body), headers, body)
        conn = self._idle_connection(key)
        reused = conn is not None
        if conn is None:
            if on_sent is not None:
                on_sent()
                on_sent = None
            conn = await self._open(key)
        resp = self._write(conn, request, on_complete)
        written = time.monotonic() if reused else 0.0
        if on_sent is not None:
            on_sent()
        loop = conn.loop
        if self._sweeper is None:
            self._start_sweeper(loop)
        waiting = self._waiting
        resent = False
        while True:
            try:
                # the wait for the answer's head, here rather than in a coroutine of the response's: one frame less
                # on the step that resumes the request when its answer arrives
                while not resp._head_done:
                    if resp._error is not None:
                        raise resp._error
                    resp._waiter = waiter = loop.create_future()
                    resp.deadline = loop.time() + resp._read_timeout  # the sweeper enforces it (no timer per wait)
                    waiting.add(resp)
                    try:
                        await waiter
                    finally:
                        waiting.discard(resp)
                        resp._waiter = None
                if resp._error is not None:
                    raise resp._error
                return resp
            except UpstreamError:
                resp.close()
                if resent or not (reused and stale(resp) and time.monotonic() - written <= self.stale_window):
                    raise
                # The replica closed this kept-alive connection while it sat idle here (its keep-alive timeout, a
                # restart) and the close crossed our write: nothing of the answer came, so nothing of the request
                # was processed. Once more on a fresh connection; not the replica's failure (the caller never sees
                # it).
                self.stale_retries += 1
                log.debug("a pooled connection to %s:%d was closed by the replica: resending on a new one", *key[:2])
                resent = True
                conn = await self._open(key)
                resp = self._write(conn, request, on_complete)
            except BaseException:
                resp.close()
                raise

    @staticmethod
    def _write(
        conn: _Connection, request: bytes, on_complete: Callable[[UpstreamResponse], bool] | None
    ) -> UpstreamResponse:
        resp = UpstreamResponse(conn, conn.pool.read_timeout, on_complete)
        conn.response = resp
        assert conn.transport is not None
        conn.transport.write(request)
        return resp

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conns in self._idle.values():
            for c in conns:
                if c.transport is not None:
                    c.transport.close()
        self._idle.clear()
