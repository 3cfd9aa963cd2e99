"""A load generator and an instant fake engine cheap enough not to be the bottleneck of a router benchmark.

Both speak just enough HTTP/1.1 over raw asyncio protocols (keep-alive, Content-Length or chunked bodies), so
one core drives well over 10k requests/s: what is measured is the router in the middle, not this harness.

The fake engine answers POST /v1/chat/completions at once: a JSON completion, or, when the body asks for
`"stream": true`, an SSE stream of `chunks` events written `chunk_gap` seconds apart (separate small writes, as
an engine's token stream is: the pattern that stalls on Nagle + delayed ACK if a proxy leaves TCP_NODELAY off).
GET requests (health, models, server info) get a small JSON body.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass, field

COMPLETION = json.dumps(
    {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
     "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
     "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
).encode()  # fmt: skip
MODELS = json.dumps({"object": "list", "data": [{"id": "m", "object": "model", "max_model_len": 32768}]}).encode()
SSE_CHUNK = (
    b'data: {"id":"x","object":"chat.completion.chunk","created":0,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"tok "},"finish_reason":null}]}\n\n'
)


def _response(body: bytes, ctype: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    ) + body


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class _EngineProtocol(asyncio.Protocol):
    def __init__(self, server: InstantEngine):
        self.server = server
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-length":
                    length = int(v)
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4 : end + 4 + length]
            self.buf = self.buf[end + 4 + length :]
            self.server.requests += 1
            self._answer(head.split(" ", 2), body)

    def _answer(self, request_line: list[str], body: bytes) -> None:
        assert self.transport is not None
        method, path = request_line[0], request_line[1]
        if method == "POST":
            if b'"stream":true' in body.replace(b" ", b""):
                asyncio.get_running_loop().create_task(self._stream())
            else:
                self.transport.write(self.server.completion)
        elif path.startswith("/v1/models"):
            self.transport.write(self.server.models)
        else:
            self.transport.write(self.server.small)

    async def _stream(self) -> None:
        t = self.transport
        assert t is not None
        t.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(self.server.chunks):
            if i:
                await asyncio.sleep(self.server.chunk_gap)
            t.write(_chunk(SSE_CHUNK))
        t.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


@dataclass
class InstantEngine:
    chunks: int = 4
    chunk_gap: float = 0.002
    requests: int = 0
    completion: bytes = field(default_factory=lambda: _response(COMPLETION))
    models: bytes = field(default_factory=lambda: _response(MODELS))
    small: bytes = field(default_factory=lambda: _response(b'{"model_path": "m"}'))

    async def serve(self, host: str, port: int) -> asyncio.AbstractServer:
        loop = asyncio.get_running_loop()
        return await loop.create_server(lambda: _EngineProtocol(self), host, port, backlog=4096, reuse_address=True)


def run_instant_engine(port: int, chunks: int = 4, chunk_gap: float = 0.002) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def main() -> None:
        server = await InstantEngine(chunks, chunk_gap).serve("127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


class _RelayUp(asyncio.Protocol):
    """The relay's leg to the engine: what arrives goes to the client as is."""

    def __init__(self, down: _RelayDown):
        self.down = down

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.down.transport is not None:
            self.down.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.down.transport is not None:
            self.down.transport.close()


class _RelayDown(asyncio.Protocol):
    """The relay's leg to a client: one engine connection per client connection, bytes passed unparsed."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.up: asyncio.Transport | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        self.up, _ = await loop.create_connection(lambda: _RelayUp(self), *self.upstream)  # type: ignore[assignment]
        for data in self.pending:
            self.up.write(data)  # type: ignore[union-attr]
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        if self.up is not None:
            self.up.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None:
            self.up.close()


def run_relay(port: int, upstream: str) -> None:
    """A byte relay (no HTTP parsing, no routing) in front of one engine: the floor any proxy process on this
    machine pays for the extra hop (two more socket writes and wakeups per request), measured beside the routers."""
    host, _, up_port = upstream.removeprefix("http://").rpartition(":")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _RelayDown((host, int(up_port))), "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------------------------
# load generator
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    status: int
    first_byte: float  # seconds from sending to the first body byte
    total: float


class _ClientProtocol(asyncio.Protocol):
    """One kept-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.waiter: asyncio.Future[Timing] | None = None
        self.t0 = 0.0
        self.first = 0.0
        self.status = 0
        self.head_done = False
        self.length: int | None = None
        self.chunked = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))

    def send(self, data: bytes) -> asyncio.Future[Timing]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.buf, self.head_done, self.first, self.length, self.chunked = b"", False, 0.0, None, False
        self.t0 = time.perf_counter()
        self.transport.write(data)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.head_done:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1").split("\r\n")
            self.status = int(head[0].split(" ", 2)[1])
            for line in head[1:]:
                k, _, v = line.partition(":")
                k = k.strip().lower()
                if k == "content-length":
                    self.length = int(v)
                elif k == "transfer-encoding" and "chunked" in v.lower():
                    self.chunked = True
            if self.status in (204, 304) or self.status < 200:
                self.length, self.chunked = 0, False  # no body, whatever the headers say (RFC 9110 6.4.1)
            self.buf = self.buf[end + 4 :]
            self.head_done = True
        if self.buf and not self.first:
            self.first = time.perf_counter()
        if self.chunked:
            if self.buf.endswith(b"0\r\n\r\n") and self._chunks_complete():
                self._done()
        elif self.length is not None and len(self.buf) >= self.length:
            self._done()

    def _chunks_complete(self) -> bool:
        buf, i = self.buf, 0
        while True:
            nl = buf.find(b"\r\n", i)
            if nl < 0:
                return False
            size = int(buf[i:nl].split(b";")[0], 16)
            if size == 0:
                return True
            i = nl + 2 + size + 2
            if i > len(buf):
                return False

    def _done(self) -> None:
        now = time.perf_counter()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(Timing(self.status, (self.first or now) - self.t0, now - self.t0))


def request_bytes(host: str, port: int, path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class LoadClient:
    """A pool of kept-alive connections to one server; `request(body)` sends on a free one."""

    def __init__(self, host: str, port: int, path: str = "/v1/chat/completions"):
        self.host, self.port, self.path = host, port, path
        self._idle: list[_ClientProtocol] = []
        self.errors = 0

    async def _connection(self) -> _ClientProtocol:
        while self._idle:
            c = self._idle.pop()
            if not c.lost:
                return c
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(_ClientProtocol, self.host, self.port)
        return proto

    async def request(self, body: bytes) -> Timing | None:
        c = await self._connection()
        try:
            t = await c.send(request_bytes(self.host, self.port, self.path, body))
        except ConnectionError:
            self.errors += 1
            return None
        self._idle.append(c)
        return t

    def close(self) -> None:
        for c in self._idle:
            if c.transport is not None:
                c.transport.close()
        self._idle.clear()


async def fixed_rate(client: LoadClient, bodies: list[bytes], rate: float, duration: float) -> list[Timing]:
    """Open loop: one request every 1/rate s (each on a free kept-alive connection); returns 200s' timings."""
    out: list[Timing] = []

    async def one(body: bytes) -> None:
        t = await client.request(body)
        if t is not None and t.status == 200:
            out.append(t)

    for i in range(50):  # open and warm the connections
        await one(bodies[i % len(bodies)])
    out.clear()
    tasks = []
    n = int(rate * duration)
    start = time.perf_counter()
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(bodies[i % len(bodies)])))
    await asyncio.gather(*tasks)
    return out


async def closed_loop(client: LoadClient, bodies: list[bytes], concurrency: int, duration: float) -> float:
    """`concurrency` connections each sending back to back; returns 200s per second."""
    done = 0
    stop = time.perf_counter() + duration

    async def worker(k: int) -> None:
        nonlocal done
        i = k
        while time.perf_counter() < stop:
            t = await client.request(bodies[i % len(bodies)])
            i += concurrency
            done += t is not None and t.status == 200

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return done / (time.perf_counter() - t0)
