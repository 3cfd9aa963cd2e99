"""A router killed under load comes back on a warm index: it rebuilds the prefix index from the replicas' KV-event
snapshots (and fetches the tokenizer) before it listens, so its first request already follows the cache, and no
request sent once it listens fails."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time

import aiohttp
from router_fake_engine import FakeEngine, word_tokenizer_info, words

TOK = word_tokenizer_info()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat(system: str, user: str) -> dict:
    return {"model": "m", "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}


async def _start_router(port: int, engines: list[FakeEngine]) -> asyncio.subprocess.Process:
    args = ["router", "--host", "127.0.0.1", "--port", str(port), "--model", "m", "--workers", "1",
            "--debug-headers", "--health-interval", "0.3", "--log-level", "warning"]  # fmt: skip
    for e in engines:
        args += ["--backend", e.url]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kubellm.cli", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    line = await asyncio.wait_for(proc.stdout.readline(), 60)  # type: ignore[union-attr]
    assert b"listening on" in line, line
    return proc


async def _send(url: str, body: dict) -> tuple[int, str, str]:
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s,
        s.post(url + "/v1/chat/completions", json=body) as r,
    ):
        await r.read()
        return r.status, r.headers.get("X-Kubellm-Backend", ""), r.headers.get("X-Kubellm-Route", "")


async def test_a_killed_router_restarts_on_a_warm_index_and_fails_nothing_sent_after_it_listens():
    a, b = [await FakeEngine(n, tokenizer=TOK).start() for n in ("a", "b")]
    system = words(0, 320)  # ~20 blocks of 16 tokens
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    procs: list[asyncio.subprocess.Process] = []
    try:
        async with aiohttp.ClientSession() as http, http.post(b.url + "/v1/chat/completions", json=chat(system, "w1")):
            pass  # B holds the prefix (warmed directly: the router learns it from B's events)
        first = await _start_router(port, [a, b])
        procs.append(first)
        assert await _send(url, chat(system, "w2")) == (200, b.url, "prefix_hit")

        # load through the router while it is killed
        stop = asyncio.Event()
        outcomes: list[tuple[float, int | str]] = []

        async def load(i: int) -> None:
            while not stop.is_set():
                t = time.monotonic()
                try:
                    status, _, _ = await _send(url, chat(words(5000 + i * 50, 40), "load"))
                    outcomes.append((t, status))
                except aiohttp.ClientError as e:
                    outcomes.append((t, type(e).__name__))
                await asyncio.sleep(0.005)

        loaders = [asyncio.create_task(load(i)) for i in range(4)]
        while len(outcomes) < 20:
            await asyncio.sleep(0.01)
        first.send_signal(signal.SIGKILL)
        await first.wait()

        b.snapshot_delay = 0.8  # a large cache's snapshot takes a while: the new router must not route before it
        second = await _start_router(port, [a, b])
        procs.append(second)
        ready = time.monotonic()
        # its very first routed request follows B's cache: the index came from B's snapshot, not from traffic
        assert await _send(url, chat(system, "w3")) == (200, b.url, "prefix_hit")
        while sum(1 for t, _ in outcomes if t >= ready) < 40:
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.gather(*loaders)
        after = [o for t, o in outcomes if t >= ready]
        assert after and all(o == 200 for o in after), [o for o in after if o != 200][:5]
    finally:
        for p in procs:
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
                await asyncio.wait_for(p.wait(), 15)
        for e in (a, b):
            await e.kill()
