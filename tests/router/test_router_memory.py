"""Bounded memory: a stream of unique ~2 kB prompts fills the router's approximate index to its configured bound,
after which its RSS stays flat (the full-scale figure, 500k prompts, is bench/router.py's `memory` mode)."""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import sys

import aiohttp
import psutil
import pytest
from router_fake_engine import FakeEngine

pytestmark = pytest.mark.slow

PROMPTS = 12_000
SAMPLES = 12
INDEX_BOUND = 20_000  # (replica, block) entries; a ~2 kB prompt is ~32 text blocks, so ~600 prompts fill it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_rss_is_flat_under_a_stream_of_unique_prompts():
    engine = await FakeEngine("e", kv_events=False).start()
    engine.n_chunks = 1
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kubellm.cli", "router", "--host", "127.0.0.1", "--port", str(port), "--model", "m",
        "--workers", "1", "--backend", engine.url, "--kv-events", "off", "--approx-index-size", str(INDEX_BOUND),
        "--log-level", "warning", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    rng = random.Random(0)
    rss: list[int] = []
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)  # type: ignore[union-attr]
        assert b"listening on" in line, line
        router = psutil.Process(proc.pid)
        sent = 0
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16)) as http:

            async def one() -> None:
                nonlocal sent
                text = " ".join(f"{rng.random():.12f}" for _ in range(140))  # ~2 kB, unique
                body = {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 1}
                async with http.post(url + "/v1/chat/completions", json=body) as r:
                    assert r.status == 200, await r.text()
                    await r.read()
                sent += 1

            per_sample = PROMPTS // SAMPLES
            for _ in range(SAMPLES):
                for _ in range(per_sample // 16):
                    await asyncio.gather(*(one() for _ in range(16)))
                rss.append(router.memory_info().rss)
        assert engine.completed == sent >= PROMPTS - SAMPLES * 16
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 15)
        await engine.kill()
    tail = rss[-SAMPLES // 3 :]  # the last third of the stream, long after the index filled
    mean = sum(tail) / len(tail)
    assert all(abs(x - mean) <= 0.05 * mean for x in tail), [f"{x / 2**20:.1f} MiB" for x in rss]
