"""A kept-alive upstream connection the replica closed while it sat idle in the router's pool: the request that
meets it is sent once more on a fresh connection and is not the replica's failure; nothing else is resent.

The replica here is a raw asyncio server whose connections can be told to end (FIN, or RST) when a given POST
arrives, before answering it: what the router sees when a replica's keep-alive close crosses its write. One test
makes that race happen for real, with a replica in a thread that closes an idle connection while the router's
event loop is held, so the close cannot be noticed before the next request is written.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading

import aiohttp
import pytest

from kubellm.router.app import RouterServer
from kubellm.router.config import RouterConfig
from kubellm.router.upstream import UpstreamError, UpstreamPool
from kubellm.routing import RoutingPolicy

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def answer(body: bytes, status: int = 200) -> bytes:
    return b"HTTP/1.1 %d OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (
        status,
        len(body),
        body,
    )


class DroppingReplica:
    """Answers GETs (/health, /v1/models) and POSTs with JSON; the POSTs listed in `drop` ((connection number,
    POST number on that connection), both from 1) end the connection instead of being answered: `how` is
    "close" (FIN), "reset" (RST) or "partial" (the status line, then FIN: an answer begun, then cut); `delay`
    seconds pass first (a replica processing the request before it fails)."""

    def __init__(self, drop: set[tuple[int, int]], how: str = "close", delay: float = 0.0):
        self.drop, self.how, self.delay = drop, how, delay
        self.post_connections = 0  # connections that carried a POST
        self.posts: list[tuple[int, int, bytes]] = []  # (connection, POST number on it, body), answered or not
        self.server: asyncio.AbstractServer | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn, n_posts = 0, 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path = lines[0].split(" ")[:2]
                length = 0
                for line in lines[1:]:
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                body = await reader.readexactly(length)
                if method == "GET":
                    data = {"data": [{"id": "m", "object": "model"}]} if path == "/v1/models" else {"status": "ok"}
                    writer.write(answer(json.dumps(data).encode()))
                    continue
                if not conn:
                    self.post_connections += 1
                    conn = self.post_connections
                n_posts += 1
                self.posts.append((conn, n_posts, body))
                if (conn, n_posts) in self.drop:
                    await asyncio.sleep(self.delay)
                    if self.how == "reset":
                        sock = writer.get_extra_info("socket")
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        writer.transport.abort()
                        return
                    if self.how == "partial":
                        writer.write(b"HTTP/1.1 200 OK\r\n")
                        await writer.drain()
                    writer.close()
                    return
                writer.write(answer(b'{"conn": %d, "post": %d}' % (conn, n_posts)))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


def key(port: int) -> tuple[str, int, bool]:
    return ("127.0.0.1", port, False)


async def send(pool: UpstreamPool, port: int, body: bytes) -> tuple[int, bytes]:
    r = await pool.send(b"POST /x HTTP/1.1\r\nHost: h\r\n", b"", body, key(port))
    try:
        return r.status, await r.read()
    finally:
        r.close()


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_a_reused_connection_ended_before_any_answer_byte_is_resent_once_on_a_new_one(how):
    replica = DroppingReplica({(1, 2)}, how)
    port = await replica.start()
    pool = UpstreamPool(connect_timeout=2, read_timeout=5)
    try:
        assert await send(pool, port, b"first") == (200, b'{"conn": 1, "post": 1}')
        # the second request goes out on the kept-alive connection, which ends without a byte of an answer
        assert await send(pool, port, b"second") == (200, b'{"conn": 2, "post": 1}')
        assert [(c, n, b) for c, n, b in replica.posts] == [(1, 1, b"first"), (1, 2, b"second"), (2, 1, b"second")]
        assert pool.stale_retries == 1
        assert await send(pool, port, b"third") == (200, b'{"conn": 2, "post": 2}')  # the new one is pooled
    finally:
        pool.close()
        await replica.stop()


async def test_no_resend_once_an_answer_began_nor_on_a_new_connection_nor_twice():
    # an answer begun (its status line came) and then cut: the replica was processing the request
    replica = DroppingReplica({(1, 2)}, "partial")
    port = await replica.start()
    pool = UpstreamPool(connect_timeout=2, read_timeout=5)
    try:
        await send(pool, port, b"first")
        with pytest.raises(UpstreamError):
            await send(pool, port, b"second")
        assert len(replica.posts) == 2 and replica.post_connections == 1 and pool.stale_retries == 0
    finally:
        pool.close()
        await replica.stop()
    # a NEW connection ending without an answer is the replica failing: not resent
    replica = DroppingReplica({(1, 1)}, "close")
    port = await replica.start()
    pool = UpstreamPool(connect_timeout=2, read_timeout=5)
    try:
        with pytest.raises(UpstreamError):
            await send(pool, port, b"first")
        assert len(replica.posts) == 1 and pool.stale_retries == 0
    finally:
        pool.close()
        await replica.stop()
    # the resend itself meets the same end (a replica dropping every request): one resend, then the error
    replica = DroppingReplica({(1, 2), (2, 1)}, "close")
    port = await replica.start()
    pool = UpstreamPool(connect_timeout=2, read_timeout=5)
    try:
        await send(pool, port, b"first")
        with pytest.raises(UpstreamError):
            await send(pool, port, b"second")
        assert [(c, n) for c, n, _ in replica.posts] == [(1, 1), (1, 2), (2, 1)] and pool.stale_retries == 1
    finally:
        pool.close()
        await replica.stop()


async def test_the_real_race_an_idle_close_the_pool_has_not_seen_yet():
    """A replica (blocking sockets, its own thread) closes its end of an idle kept-alive connection while the
    router's loop is held, so the FIN is still unread when the next request is written on that connection."""
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    close_idle, closed = threading.Event(), threading.Event()
    accepted: list[int] = []

    def read_request(f) -> bytes:  # type: ignore[no-untyped-def]
        length = 0
        while (line := f.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        return f.read(length)

    def serve() -> None:
        for i in range(2):
            c, _ = lsock.accept()
            accepted.append(i)
            with c, c.makefile("rb") as f:
                body = read_request(f)
                c.sendall(answer(b'{"conn": %d, "got": "%b"}' % (i + 1, body)))
                if i == 0:  # the first connection goes idle, then the replica closes it
                    close_idle.wait(10)
                    c.shutdown(socket.SHUT_RDWR)
                    closed.set()
                else:
                    c.settimeout(5)
                    try:
                        while body := read_request(f):
                            c.sendall(answer(b'{"conn": 2, "got": "%b"}' % body))
                    except OSError:
                        pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    pool = UpstreamPool(connect_timeout=2, read_timeout=5)
    try:
        assert await send(pool, port, b"a") == (200, b'{"conn": 1, "got": "a"}')
        close_idle.set()
        assert closed.wait(5)  # (blocks the loop on purpose: the pool cannot read the FIN before the next send)
        assert await send(pool, port, b"b") == (200, b'{"conn": 2, "got": "b"}')
        assert pool.stale_retries == 1
    finally:
        pool.close()
        lsock.close()
        await asyncio.to_thread(thread.join, 5)  # (the loop runs meanwhile: it closes the pooled connection)
    assert not thread.is_alive()


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_no_resend_when_the_replica_ended_the_connection_well_after_taking_the_request(how):
    """A reused connection that ends with no answer long after the write is not an idle close crossing it (that
    comes one round trip after the write): the replica took the request and failed processing it, and sending it
    again may process it twice (or bring the replica down twice). Not resent; the caller sees the error."""
    replica = DroppingReplica({(1, 2)}, how, delay=0.6)
    port = await replica.start()
    pool = UpstreamPool(connect_timeout=2, read_timeout=5, stale_window=0.2)
    try:
        assert await send(pool, port, b"first") == (200, b'{"conn": 1, "post": 1}')
        with pytest.raises(UpstreamError):
            await send(pool, port, b"second")
        assert [(c, n) for c, n, _ in replica.posts] == [(1, 1), (1, 2)] and pool.stale_retries == 0
    finally:
        pool.close()
        await replica.stop()


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_through_the_router_the_client_gets_its_answer_and_the_replica_no_failure(how):
    replica = DroppingReplica({(1, 2)}, how)
    port = await replica.start()
    url = f"http://127.0.0.1:{port}"
    config = RouterConfig(
        host="127.0.0.1", port=0, backends=[f"m={url}"], models=["m"], policy=RoutingPolicy.ROUND_ROBIN,
        kv_events=False, health_interval=30, breaker_threshold=1, debug_headers=True,
    )  # fmt: skip
    try:
        async with RouterServer(config) as r, aiohttp.ClientSession() as http:
            for _ in range(3):
                async with http.post(f"{r.url}/v1/chat/completions", json=CHAT) as resp:
                    assert resp.status == 200, await resp.text()
                    assert resp.headers["X-Kubellm-Backend"] == url
                    await resp.read()
            backend = r.router.registry.backends[url]
            assert backend.healthy and backend.consecutive_failures == 0 and not backend.breaker_open_until
            async with http.get(f"{r.url}/metrics") as resp:
                text = await resp.text()
            assert r.router.pool is not None and r.router.pool.stale_retries == 1
    finally:
        await replica.stop()
    assert [(c, n) for c, n, _ in replica.posts] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    codes = [line for line in text.splitlines() if line.startswith("kubellm_router_requests_total{")]
    assert len(codes) == 1 and 'code="200"' in codes[0] and codes[0].endswith(" 3.0"), codes
    retries = [line for line in text.splitlines() if line.startswith("kubellm_router_retries_total{")]
    assert all(line.endswith(" 0.0") for line in retries), retries
