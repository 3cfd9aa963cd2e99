"""The router's lean HTTP/1.1 server (router/http_server.py) over real sockets: framing, keep-alive, pipelining,
limits, streaming, disconnects, graceful stop; and the router's own routes answered through it."""

from __future__ import annotations

import asyncio
import contextvars
import json
import sys

import aiohttp
import pytest
from router_fake_engine import FakeEngine

from kubellm.router.app import RouterServer
from kubellm.router.config import RouterConfig
from kubellm.router.http_server import Exchange, HTTPServer, Request, start_eager
from kubellm.routing import RoutingPolicy


class Echo:
    """A handler: POST /echo answers the body back; /stream streams three pieces; /block waits for `release`."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.blocked = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.seen: list[str] = []

    async def __call__(self, req: Request, ex: Exchange) -> None:
        self.seen.append(req.path)
        if req.path == "/stream":
            ex.start_stream(200, [("Content-Type", "text/plain")])
            for piece in (b"one ", b"two ", b"three"):
                await ex.write(piece)
            ex.end_stream()
        elif req.path == "/block":
            self.blocked.set()
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            ex.respond(200, b"released")
        elif req.path == "/empty":
            ex.respond(204, b"", [("X-Test", "empty")])
        elif req.path == "/fail":
            raise RuntimeError("handler bug")
        elif req.path == "/silent":
            return  # a handler bug of another kind: no answer at all
        else:
            for _ in range(3):  # yield to the loop, as a handler awaiting an upstream does
                await asyncio.sleep(0)
            info = {"method": req.method, "path": req.path, "query": req.query, "len": len(req.body),
                    "x": req.headers.get("x-test")}  # fmt: skip
            ex.respond(200, json.dumps(info).encode() + req.body, [("Content-Type", "application/json")])


# every path the tests below use: the server runs each test with handlers started as Tasks, then eagerly
ALL_PATHS = ("/echo", "/two", "/three", "/four", "/five", "/empty", "/ok", "/c", "/e", "/stream", "/a", "/b", "/x",
             "/fail", "/block")  # fmt: skip


@pytest.fixture(params=["task", "eager"])
async def server(request):
    handler = Echo()
    eager = ALL_PATHS if request.param == "eager" else ()
    srv = HTTPServer(handler, max_body_bytes=1000, max_header_bytes=1024, eager_paths=eager)
    port = await srv.listen("127.0.0.1", 0)
    srv.test_port = port  # type: ignore[attr-defined]
    srv.test_handler = handler  # type: ignore[attr-defined]
    yield srv
    await srv.stop(timeout=1)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response off the wire: none for 1xx/204/304 (RFC 9110: no body, whatever the headers say), then
    Content-Length, chunked, or (no framing) read to EOF."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    if status in (204, 304) or status < 200:
        body = b""
    elif "content-length" in headers:
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readline()).strip(), 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += data[:-2]
    else:
        body = await asyncio.wait_for(reader.read(), 5)
    return status, headers, body


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


async def test_pipelined_requests_answered_in_order_on_one_connection(server):
    reader, writer = await connect(server.test_port)
    writer.write(post("/echo?a=1", b"first") + b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n" + post("/three", b"3" * 300))
    got = [await read_response(reader) for _ in range(3)]
    assert [s for s, _, _ in got] == [200, 200, 200]
    infos = [json.loads(b[: b.index(b"}") + 1]) for _, _, b in got]
    assert [(i["method"], i["path"], i["query"], i["len"]) for i in infos] == [
        ("POST", "/echo", "a=1", 5), ("GET", "/two", "", 0), ("POST", "/three", "", 300)
    ]  # fmt: skip
    assert got[0][2].endswith(b"first") and got[2][2].endswith(b"3" * 300)
    # the connection stays open for more (keep-alive), requests split across writes included
    req = post("/four/long?q=2", b"abc", "X-Test: yes\r\n")
    for i in range(len(req)):
        writer.write(req[i : i + 1])
        await writer.drain()
    status, headers, body = await read_response(reader)
    info = json.loads(body[: body.index(b"}") + 1])
    assert status == 200 and info["x"] == "yes" and body.endswith(b"abc")
    assert (info["path"], info["query"]) == ("/four/long", "q=2")  # (the request line arrived in pieces)
    assert "connection" not in headers
    # a 204 carries no body and no Content-Length; the next answer on the connection follows it directly
    writer.write(b"GET /empty HTTP/1.1\r\nHost: x\r\n\r\n" + post("/five", b"5"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 204") and b"Content-Length" not in head and b"X-Test: empty" in head
    status, _, body = await read_response(reader)
    assert status == 200 and body.endswith(b"5")
    writer.close()


@pytest.mark.parametrize(
    "raw, status, code",
    [
        (b"NOT HTTP AT ALL\r\n\r\n", 400, "bad_request"),
        (b"POST /x HTTP/1.1\r\nContent-Length: nope\r\n\r\n", 400, "bad_request"),
        (b"GET /x HTTP/1.1\r\nX-Big: " + b"y" * 2000 + b"\r\n\r\n", 431, "headers_too_large"),
        (b"GET /x HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 900) for i in range(80)) + b"\r\n", 431,
         "headers_too_large"),
        (b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\n\r\n", 431, "headers_too_large"),
        (b"POST /x HTTP/1.1\r\nContent-Length: 5000\r\n\r\n", 413, "body_too_large"),
        (b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"z" * 1024 + b"\r\n" * 3, 413,
         "body_too_large"),
    ],
)  # fmt: skip
async def test_bad_requests_get_json_errors_and_the_connection_closes(server, raw, status, code):
    reader, writer = await connect(server.test_port)
    writer.write(raw)
    got_status, headers, body = await read_response(reader)
    assert got_status == status
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == code
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed
    assert server.test_handler.seen == []
    writer.close()


async def test_error_after_a_good_pipelined_request_comes_after_its_answer(server):
    reader, writer = await connect(server.test_port)
    writer.write(post("/ok", b"fine") + b"BROKEN\r\n\r\n")
    status1, _, body1 = await read_response(reader)
    status2, _, _ = await read_response(reader)
    assert (status1, status2) == (200, 400) and body1.endswith(b"fine")
    writer.close()


async def test_chunked_request_body_and_expect_continue(server):
    reader, writer = await connect(server.test_port)
    writer.write(b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    status, _, body = await read_response(reader)
    assert status == 200 and body.endswith(b"abcde")
    writer.write(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"wxyz")
    status, _, body = await read_response(reader)
    assert status == 200 and body.endswith(b"wxyz")
    writer.close()


async def test_streamed_answer_chunked_then_http10_close_delimited(server):
    reader, writer = await connect(server.test_port)
    writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert status == 200 and headers["transfer-encoding"] == "chunked" and body == b"one two three"
    writer.close()
    reader, writer = await connect(server.test_port)
    writer.write(b"GET /stream HTTP/1.0\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head and b"Connection: close" in head
    assert await asyncio.wait_for(reader.read(), 5) == b"one two three"
    writer.close()


async def test_http10_keep_alive_and_head(server):
    reader, writer = await connect(server.test_port)
    writer.write(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    status, headers, _ = await read_response(reader)
    assert status == 200 and headers["connection"] == "keep-alive"
    writer.write(b"HEAD /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    status, headers, _ = await asyncio.wait_for(read_head_only(reader), 5)
    assert status == 200 and int(headers["content-length"]) > 0
    writer.write(b"GET /b HTTP/1.0\r\n\r\n")  # no keep-alive: answered, then closed
    status, headers, _ = await read_response(reader)
    assert status == 200 and headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def read_head_only(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
    return int(lines[0].split()[1]), headers, b""


@pytest.mark.parametrize("path", ["/fail", "/silent"])
async def test_handler_error_or_no_answer_is_a_500_json_and_the_connection_closes(server, path):
    reader, writer = await connect(server.test_port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    status, headers, body = await read_response(reader)
    assert status == 500 and json.loads(body)["error"]["code"] == "internal_error"
    assert headers["connection"] == "close" and await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_client_disconnect_cancels_the_handler(server):
    _reader, writer = await connect(server.test_port)
    writer.write(b"GET /block HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(server.test_handler.blocked.wait(), 5)
    writer.close()
    await asyncio.wait_for(server.test_handler.cancelled.wait(), 5)


async def test_graceful_stop_finishes_requests_in_progress_and_closes_idle_connections(server):
    idle_reader, idle_writer = await connect(server.test_port)
    idle_writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    await read_response(idle_reader)
    reader, writer = await connect(server.test_port)
    writer.write(b"GET /block HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(server.test_handler.blocked.wait(), 5)
    stopping = asyncio.create_task(server.stop(timeout=5))
    assert await asyncio.wait_for(idle_reader.read(), 5) == b""  # the idle keep-alive connection is closed
    with pytest.raises(OSError):
        await connect(server.test_port)  # no longer accepting
    server.test_handler.release.set()
    status, headers, body = await read_response(reader)
    assert (status, body, headers["connection"]) == (200, b"released", "close")
    await asyncio.wait_for(stopping, 5)
    assert not server.test_handler.cancelled.is_set()
    writer.close()
    idle_writer.close()


async def test_eager_paths_run_their_handler_in_the_read_callback():
    """A handler on an eager path runs when its request is read, up to its first await: one that answers without
    awaiting needs no Task at all; one that awaits (the yields in /x) carries on and answers the same: in an eager
    Task on 3.12+, driven by the futures it awaits without any Task on 3.11 (http_server._Driver)."""
    loop = asyncio.get_running_loop()
    created: list[str] = []

    def factory(loop: asyncio.AbstractEventLoop, coro):  # type: ignore[no-untyped-def]
        created.append(coro.__qualname__)
        return asyncio.Task(coro, loop=loop)

    srv = HTTPServer(Echo(), max_body_bytes=1000, max_header_bytes=1024, eager_paths=("/empty", "/x"))
    port = await srv.listen("127.0.0.1", 0)
    reader, writer = await connect(port)  # (the stream's own tasks, if any, before counting)
    loop.set_task_factory(factory)
    try:
        for _ in range(3):
            writer.write(b"GET /empty HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, _ = await read_response(reader)
            assert status == 204
        assert [c for c in created if "_serve" in c] == []
        writer.write(post("/x", b"abc"))
        status, _, body = await read_response(reader)
        assert status == 200 and body.endswith(b"abc")
        went_on_in_a_task = any("_serve" in c for c in created)
        assert went_on_in_a_task == (sys.version_info >= (3, 12))
        before = len(created)
        writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")  # not eager: a Task from the start
        status, _, _ = await read_response(reader)
        assert status == 200 and any(c.endswith("_serve") for c in created[before:])
    finally:
        loop.set_task_factory(None)
        writer.close()
        await srv.stop(timeout=1)


async def test_router_routes_through_the_lean_server():
    engine = await FakeEngine("e0").start()
    config = RouterConfig(host="127.0.0.1", port=0, backends=[engine.url], models=["m", "org/model"],
                          policy=RoutingPolicy.ROUND_ROBIN, health_interval=0.2)  # fmt: skip
    try:
        async with RouterServer(config) as r, aiohttp.ClientSession() as http:
            async with http.get(f"{r.url}/no/such/path") as resp:
                assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
            async with http.get(f"{r.url}/v1/chat/completions") as resp:
                assert resp.status == 405 and resp.headers["Allow"] == "POST"
            async with http.post(f"{r.url}/health") as resp:
                assert resp.status == 405
            async with http.get(f"{r.url}/v1/models/org/model") as resp:
                assert resp.status == 200 and (await resp.json())["id"] == "org/model"
            async with http.get(f"{r.url}/v1/models/nope") as resp:
                assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"
            async with http.get(f"{r.url}/openapi.json") as resp:
                assert "/v1/chat/completions" in (await resp.json())["paths"]
            reader, writer = await connect(r.port)
            writer.write(b"\x16\x03\x01 tls hello to a plain port\r\n\r\n")
            status, _, body = await read_response(reader)
            assert status == 400 and json.loads(body)["error"]["code"] == "bad_request"
            writer.close()
    finally:
        await engine.kill()


async def test_expect_continue_is_not_written_into_an_answer_in_progress_nor_to_http10(server):
    """A pipelined request with Expect: 100-continue arriving while an earlier answer is in progress: the interim
    100 would land inside (or be taken for part of) that answer, so none is sent; the bytes on the wire are exactly
    the two final answers in order. An HTTP/1.0 client never gets a 100 either."""
    reader, writer = await connect(server.test_port)
    writer.write(b"GET /block HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(server.test_handler.blocked.wait(), 5)
    writer.write(post("/e", b"wxyz", "Expect: 100-continue\r\n"))
    await asyncio.wait_for(_until(lambda: server.test_handler.seen == ["/block"] and _parsed(server)), 5)
    server.test_handler.release.set()
    first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert first.startswith(b"HTTP/1.1 200"), first
    assert await reader.readexactly(len(b"released")) == b"released"
    status, _, body = await read_response(reader)
    assert status == 200 and body.endswith(b"wxyz")
    writer.close()
    reader, writer = await connect(server.test_port)
    writer.write(b"POST /e HTTP/1.0\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\nab")
    status, _, body = await read_response(reader)
    assert status == 200 and body.endswith(b"ab")
    writer.close()


def _parsed(server: HTTPServer) -> bool:
    """The server has read a second, pipelined request on some connection (it waits behind the first)."""
    return any(c.queue for c in server.connections)


async def _until(check) -> None:
    while not check():
        await asyncio.sleep(0.005)


async def test_a_client_that_stops_reading_a_stream_is_cut_off_after_the_request_timeout():
    """A client that asks for an endless stream and then reads nothing: once its socket buffers are full the handler
    waits to write; after request_timeout of that the connection is closed and the handler ends (the router's then
    aborts its upstream request) instead of both waiting forever."""
    ended = asyncio.Event()
    written = [0]

    async def endless(req: Request, ex: Exchange) -> None:
        ex.start_stream(200, [("Content-Type", "text/plain")])
        piece = b"x" * 65536
        try:
            while True:
                await ex.write(piece)
                written[0] += len(piece)
        finally:
            ended.set()

    srv = HTTPServer(endless, max_body_bytes=1000, max_header_bytes=1024, request_timeout=0.3)
    port = await srv.listen("127.0.0.1", 0)
    try:
        _reader, writer = await connect(port)
        writer.write(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(ended.wait(), 10)  # without the cut-off: a hang, ended by this deadline
        assert written[0] < 256 << 20  # stopped by the full socket, not by memory
        writer.close()
    finally:
        await srv.stop(timeout=1)


async def _trickle(writer: asyncio.StreamWriter, data: bytes, gap: float, stop: asyncio.Event) -> None:
    """A byte every `gap` seconds (well under any idle limit) until all is sent, the answer came, or the server
    closed."""
    for i in range(len(data)):
        if stop.is_set():
            return
        try:
            writer.write(data[i : i + 1])
            await writer.drain()
        except ConnectionError:
            return
        await asyncio.sleep(gap)


async def test_a_refused_client_that_goes_on_sending_still_reads_its_answer():
    """A refusal (here 413 on the head) closes the connection while the client may still be sending: the server
    half-closes, then reads and drops what comes (a lingering close). Closed at once, the bytes that arrive after
    would be answered with a RST, and the client's stack drops the answer it had not read (ECONNRESET, no 413)."""
    srv = HTTPServer(Echo(), max_body_bytes=10, max_header_bytes=1024, request_timeout=5)
    port = await srv.listen("127.0.0.1", 0)
    try:
        reader, writer = await connect(port)
        writer.write(post("/echo", b"y" * 100)[:-100])
        await asyncio.sleep(0.2)  # the 413 is out and (before the fix) the server's socket closed
        for _ in range(5):
            writer.write(b"y" * 20)
            await writer.drain()
            await asyncio.sleep(0.05)
        status, headers, body = await read_response(reader)
        assert status == 413 and headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == "body_too_large"
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the server's FIN
        writer.close()
        await asyncio.wait_for(_until(lambda: not srv.connections), 5)  # gone once the client closed its side
    finally:
        await srv.stop()


@pytest.mark.parametrize("phase", ["head", "body"])
async def test_a_client_trickling_its_request_gets_408_at_the_total_deadline(phase):
    """A byte every 50 ms never leaves the connection idle, but the whole request (head + body) must be in within
    request_timeout of its first byte: 408 in OpenAI's error shape, then the connection closes. The request would
    take 5-10 s at that pace; the answer must come near the 0.5 s deadline (by 4 s on a loaded machine)."""
    handler = Echo()
    srv = HTTPServer(handler, max_body_bytes=1000, max_header_bytes=1024, request_timeout=0.5)
    port = await srv.listen("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    try:
        reader, writer = await connect(port)
        request = post("/echo", b"y" * 100)
        head_len = request.index(b"\r\n\r\n") + 4
        if phase == "body":  # the head at once: its first byte starts the clock all the same
            writer.write(request[:head_len])
            request = request[head_len:]
        started, stop = loop.time(), asyncio.Event()
        sender = asyncio.create_task(_trickle(writer, request, 0.05, stop))
        try:
            status, headers, body = await asyncio.wait_for(read_response(reader), 4)
        finally:
            stop.set()
            await sender
        elapsed = loop.time() - started
        assert status == 408 and headers["connection"] == "close"
        err = json.loads(body)["error"]
        assert err["code"] == "request_timeout" and "0.5s" in err["message"]
        assert 0.5 <= elapsed < 4, elapsed
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed
        assert handler.seen == []  # the handler never saw the partial request
        writer.close()
    finally:
        await srv.stop(timeout=1)


async def test_a_large_upload_at_a_steady_rate_is_not_cut_at_the_deadline():
    """The total deadline grows with the body received (min_upload_rate bytes per second): a large body sent at a
    steady, legitimate pace that takes longer than request_timeout is served whole, not answered 408. Here 96 KiB
    at ~64 KiB/s (about 1.5 s) against a 0.5 s deadline and a 16 KiB/s minimum rate."""
    handler = Echo()
    srv = HTTPServer(
        handler, max_body_bytes=1 << 20, max_header_bytes=1024, request_timeout=0.5, min_upload_rate=16 * 1024
    )
    port = await srv.listen("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    try:
        reader, writer = await connect(port)
        payload = bytes(range(256)) * 384  # 96 KiB
        request = post("/echo", payload)
        started = loop.time()
        for i in range(0, len(request), 4096):
            writer.write(request[i : i + 4096])
            await writer.drain()
            await asyncio.sleep(0.06)
        status, _headers, body = await asyncio.wait_for(read_response(reader), 10)
        assert loop.time() - started > 0.5  # the upload outlasted request_timeout
        assert status == 200, body[:200]
        assert body.endswith(payload) and handler.seen == ["/echo"]
        writer.close()
    finally:
        await srv.stop(timeout=1)


async def test_the_router_answers_a_trickled_request_408_and_serves_whole_ones():
    """--client-timeout reaches the router's server: a trickled routed POST gets the router's OpenAI-shaped 408; a
    request sent whole on a fresh connection is routed as usual."""
    engine = await FakeEngine("e0").start()
    config = RouterConfig(host="127.0.0.1", port=0, backends=[engine.url], models=["m"], client_timeout=0.5,
                          policy=RoutingPolicy.ROUND_ROBIN, health_interval=30)  # fmt: skip
    try:
        async with RouterServer(config) as r:
            body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
            request = post("/v1/chat/completions", body, "Content-Type: application/json\r\n")
            reader, writer = await connect(r.port)
            stop = asyncio.Event()
            sender = asyncio.create_task(_trickle(writer, request, 0.05, stop))
            try:
                status, _, answer = await asyncio.wait_for(read_response(reader), 4)
            finally:
                stop.set()
                await sender
            writer.close()
            assert status == 408
            assert set(json.loads(answer)["error"]) == {"message", "type", "param", "code"}
            assert engine.received == []
            reader, writer = await connect(r.port)
            writer.write(request)
            status, _, answer = await read_response(reader)
            assert status == 200 and json.loads(answer)["choices"][0]["message"]["content"].startswith("e0")
            writer.close()
    finally:
        await engine.kill()


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.12+ carries eager handlers on in native eager Tasks")
async def test_driver_carries_a_coroutine_on_as_a_task_would():
    """start_eager's driver on 3.11 (no Task): results and exceptions of awaited futures reach the coroutine where it
    awaited, a bare yield (sleep(0)) goes on at the next turn, cancel() while it waits cancels the awaited future and
    the coroutine sees CancelledError there, cancel() after that future completed but before the wake-up replaces the
    result with CancelledError, and done() says when the coroutine returned."""
    loop = asyncio.get_running_loop()
    seen: list[object] = []

    async def body(futs: list[asyncio.Future[int]]) -> None:
        try:
            seen.append(await futs[0])
            await asyncio.sleep(0)
            seen.append("slept")
            try:
                await futs[1]
            except ValueError as e:
                seen.append(f"raised {e}")
            seen.append(await futs[2])
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    futs = [loop.create_future() for _ in range(3)]
    driver = start_eager(loop, body(futs))
    assert driver is not None and not driver.done() and seen == []
    futs[0].set_result(1)
    futs[1].set_exception(ValueError("boom"))
    futs[2].set_result(3)
    await asyncio.wait_for(_until(driver.done), 5)
    assert seen == [1, "slept", "raised boom", 3]

    seen.clear()
    futs = [loop.create_future() for _ in range(3)]
    driver = start_eager(loop, body(futs))
    assert driver is not None and driver.cancel()
    await asyncio.wait_for(_until(driver.done), 5)
    assert seen == ["cancelled"] and futs[0].cancelled() and not driver.cancel()

    seen.clear()
    futs = [loop.create_future() for _ in range(3)]
    driver = start_eager(loop, body(futs))
    assert driver is not None
    futs[0].set_result(1)  # done, its wake-up not yet run
    assert driver.cancel()
    await asyncio.wait_for(_until(driver.done), 5)
    assert seen == ["cancelled"]

    async def returns_at_once() -> None:
        return None

    assert start_eager(loop, returns_at_once()) is None


_REQUEST_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("request_var", default="unset")


@pytest.mark.parametrize("mode", ["task", "eager"])
async def test_a_context_variable_a_handler_sets_does_not_reach_the_next_request(mode):
    """Each handler runs in a context of its own, as a Task's: a ContextVar it sets (before its first await, or after
    it) is not seen by the next request on the same kept-alive connection. An eager handler's first step runs in the
    connection's read callback, whose context the loop reuses for every read of that connection (on 3.11, without a
    Task, the value set there stayed for the next request)."""

    async def handler(req: Request, ex: Exchange) -> None:
        seen = _REQUEST_VAR.get()
        _REQUEST_VAR.set(f"{req.path} set it before awaiting")
        await asyncio.sleep(0)
        if req.path == "/late":
            _REQUEST_VAR.set("/late set it after awaiting")
        ex.respond(200, seen.encode())

    paths = ("/early", "/late")
    srv = HTTPServer(handler, max_body_bytes=1000, max_header_bytes=1024, eager_paths=paths if mode == "eager" else ())
    port = await srv.listen("127.0.0.1", 0)
    reader, writer = await connect(port)
    try:
        for path in ("/early", "/early", "/late", "/late", "/early"):
            writer.write(post(path, b"{}"))
            status, _, body = await read_response(reader)
            assert (status, body) == (200, b"unset"), path
    finally:
        writer.close()
        await srv.stop(timeout=1)
