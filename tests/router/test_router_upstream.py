"""The router's lean upstream client against a raw TCP server that writes scripted bytes in arbitrary pieces:
framing (Content-Length, chunked, until close), keep-alive reuse, a replica that dies or goes silent."""

from __future__ import annotations

import asyncio
import random

import pytest

from kubellm.router.upstream import UpstreamError, UpstreamPool


def chunked(pieces: list[bytes]) -> bytes:
    return b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces) + b"0\r\n\r\n"


class ScriptedServer:
    """Answers each request on a connection with the next scripted response, written in random small pieces."""

    def __init__(self, responses: list[bytes], close_after: bool = False, seed: int = 0):
        self.responses = responses
        self.close_after = close_after
        self.rng = random.Random(seed)
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.responses:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(
                    next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1]
                )
                self.requests.append(head + await reader.readexactly(length))
                data = self.responses.pop(0)
                i = 0
                while i < len(data):
                    n = self.rng.randint(1, 7)
                    writer.write(data[i : i + n])
                    await writer.drain()
                    await asyncio.sleep(0)
                    i += n
                if self.close_after:
                    break
            if not self.close_after:
                await reader.read()  # hold the connection (silent) until the client closes it
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


async def test_chunked_and_content_length_bodies_in_any_pieces_over_one_kept_alive_connection():
    sse = [b"data: one\n\n", b"data: two\n\n", b"x" * 300, b"data: [DONE]\n\n"]
    responses = [
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(sse),
        b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{"ok": true}',
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 2\r\nContent-Length: 4\r\n\r\nbusy",
    ]
    server = ScriptedServer(responses)
    port = await server.start()
    pool = UpstreamPool(connect_timeout=2, read_timeout=5)
    try:
        r = await pool.post("127.0.0.1", port, "/v1/chat/completions", {"X-Request-Id": "a"}, b'{"stream": true}')
        assert r.status == 200 and r.headers["content-type"] == "text/event-stream"
        assert await r.read() == b"".join(sse)
        r.close()
        r = await pool.post("127.0.0.1", port, "/v1/completions", {}, b"{}")
        assert (r.status, await r.read()) == (200, b'{"ok": true}')
        r.close()
        r = await pool.post("127.0.0.1", port, "/v1/completions", {}, b"{}")
        assert (r.status, r.headers["retry-after"], await r.read()) == (503, "2", b"busy")
        r.close()
        assert server.connections == 1  # one connection, reused for all three
        assert server.requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
        assert b"X-Request-Id: a\r\n" in server.requests[0] and server.requests[0].endswith(b'{"stream": true}')
    finally:
        pool.close()
        await server.stop()


async def test_a_body_delimited_by_close_and_a_connection_not_reused_after_it():
    server = ScriptedServer([b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"], close_after=True)
    port = await server.start()
    pool = UpstreamPool(connect_timeout=2, read_timeout=5)
    try:
        r = await pool.post("127.0.0.1", port, "/x", {}, b"")
        assert await r.read() == b"until the end"
        r.close()
        server.responses.append(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        r = await pool.post("127.0.0.1", port, "/x", {}, b"")
        assert await r.read() == b"ok"
        assert server.connections == 2
    finally:
        pool.close()
        await server.stop()


async def test_a_replica_dying_mid_body_or_going_silent_is_an_error_not_a_hang():
    cut = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    server = ScriptedServer([cut], close_after=True)
    port = await server.start()
    pool = UpstreamPool(connect_timeout=2, read_timeout=0.3)
    try:
        r = await pool.post("127.0.0.1", port, "/x", {}, b"")
        assert await r.readany() == b"hello"
        with pytest.raises(UpstreamError):
            await r.readany()
        r.close()
        silent = ScriptedServer([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"])
        silent_port = await silent.start()
        r = await pool.post("127.0.0.1", silent_port, "/x", {}, b"")
        with pytest.raises(TimeoutError):
            await r.read()
        r.close()
        await silent.stop()
    finally:
        pool.close()
        await server.stop()


async def test_a_refused_connection_is_a_connect_error():
    pool = UpstreamPool(connect_timeout=2, read_timeout=5)
    server = ScriptedServer([])
    port = await server.start()
    await server.stop()
    await asyncio.sleep(0.05)
    with pytest.raises(UpstreamError) as e:
        await pool.post("127.0.0.1", port, "/x", {}, b"")
    assert e.value.connect


async def test_https_replicas_are_reached_over_verified_tls(tmp_path):
    """https:// backends worked through aiohttp's client; the lean client speaks TLS to them too, verifying the
    certificate against the configured trust (here: a throwaway CA that signed the replica's certificate)."""
    import ssl
    import subprocess

    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    scripted = ScriptedServer([b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecure"])
    server = await asyncio.start_server(scripted._handle, "localhost", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    trusting = ssl.create_default_context(cafile=str(cert))
    pool = UpstreamPool(connect_timeout=2, read_timeout=5, ssl_context=trusting)
    untrusting = UpstreamPool(connect_timeout=2, read_timeout=5)  # the system's trust store: not our throwaway CA
    try:
        r = await pool.post("localhost", port, "/x", {}, b"", tls=True)
        assert (r.status, await r.read()) == (200, b"secure")
        r.close()
        with pytest.raises(UpstreamError) as e:
            await untrusting.post("localhost", port, "/x", {}, b"", tls=True)
        assert e.value.connect
    finally:
        pool.close()
        untrusting.close()
        server.close()


async def test_a_reader_slower_than_its_replica_holds_a_bounded_buffer_and_reads_everything_in_the_end():
    """A replica that sends 8 MiB at once to a reader that reads nothing yet: the response stops reading the socket
    once about 1 MiB waits (the rest stays in the kernel and TCP's window), reading resumes as the reader catches
    up, every byte arrives in order, and the connection goes back to the pool readable for the next answer."""
    total = 8 << 20
    payload = bytes(i % 251 for i in range(total))
    second = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for answer in (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (total, payload), second):
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(
                    next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1]
                )
                await reader.readexactly(length)
                writer.write(answer)
                await writer.drain()
            await reader.read()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = UpstreamPool(connect_timeout=2, read_timeout=5)
    try:
        resp = await pool.post("127.0.0.1", port, "/big", {}, b"{}")
        transport = resp._conn.transport
        assert transport is not None
        deadline = asyncio.get_running_loop().time() + 5
        while transport.is_reading():  # it stops reading on its own once enough waits for the reader
            assert asyncio.get_running_loop().time() < deadline, (
                f"still reading with {sum(map(len, resp._chunks))} bytes held"
            )
            await asyncio.sleep(0.005)
        held = sum(len(c) for c in resp._chunks)
        assert (1 << 20) < held < (1 << 20) + (1 << 19), held  # over the high mark by at most one socket read
        assert held < total // 4
        body = await resp.read()
        assert body == payload
        resp.close()
        again = await pool.post("127.0.0.1", port, "/small", {}, b"{}")  # the same kept-alive connection
        assert again._conn is resp._conn and again._conn.transport.is_reading()
        assert await again.read() == b"ok"
        again.close()
    finally:
        pool.close()
        server.close()
        await server.wait_closed()


async def test_on_complete_takes_a_whole_answer_in_the_read_callback_once():
    """on_complete runs once, when the last byte of a Content-Length or chunked answer is in (never on a partial
    one); what it takes is gone from the body; refusing leaves the answer to the reader;
    the connection is reused after either. Once the reader reads, on_complete is off (it would see only the rest)."""
    body = b'{"ok": true, "pad": "' + b"p" * 500 + b'"}'
    responses = [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked([body[:100], body[100:]]),
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy",
    ]
    server = ScriptedServer(list(responses), seed=3)
    port = await server.start()
    pool = UpstreamPool(connect_timeout=2, read_timeout=5)
    calls: list[tuple[int, bytes | None]] = []

    def take(resp) -> bool:  # type: ignore[no-untyped-def]
        assert resp.done
        if resp.status >= 500:
            calls.append((resp.status, None))
            return False
        calls.append((resp.status, resp.take_body()))
        return True

    try:
        for expect in ((200, body), (200, body), (503, None)):
            r = await pool.send(b"POST /x HTTP/1.1\r\nHost: h\r\n", b"", b"{}", ("127.0.0.1", port, False), None, take)
            deadline = asyncio.get_running_loop().time() + 5
            while not r.done:  # (the body arrives in small pieces after the head)
                assert asyncio.get_running_loop().time() < deadline, "the answer never completed"
                await asyncio.sleep(0.005)
            assert calls[-1] == expect and len(calls) == len(server.requests)
            assert await r.read() == (b"" if expect[1] is not None else b"busy")
            assert r.delivered == (expect[1] is not None)
            r.close()
        assert server.connections == 1
    finally:
        pool.close()
        await server.stop()
    server = ScriptedServer([responses[0]], seed=4)
    port = await server.start()
    pool = UpstreamPool(connect_timeout=2, read_timeout=5)
    try:
        r = await pool.send(b"POST /x HTTP/1.1\r\nHost: h\r\n", b"", b"{}", ("127.0.0.1", port, False), None, take)
        assert await r.read() == body and not r.delivered and len(calls) == 3
        r.close()
    finally:
        pool.close()
        await server.stop()
