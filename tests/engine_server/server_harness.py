"""Harness for the engine server tests: an in-process server (its own event loop on a thread, so sync and async
clients both work) around a fake or real engine, and a real `kubellm serve` subprocess. A module of its own name
(not conftest) so test modules import it unambiguously when other test folders are collected in the same run."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubellm.engine.server.api_server import Server, ServerSettings


class ServerThread:
    """A Server on 127.0.0.1:<free port>, its event loop on a background thread."""

    def __init__(
        self, factory: Callable[[], Any], settings: ServerSettings | None = None, max_waiting: int | None = None
    ):
        self.settings = settings or ServerSettings(host="127.0.0.1", port=0, served_model_names=["fake-model"])
        self.server = Server(factory, self.settings, max_waiting_requests=max_waiting)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> ServerThread:
        self._thread.start()
        self.call(self.server.start(), timeout=300)
        return self

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def engine(self) -> Any:
        return self.server.async_engine.engine

    def stop(self) -> None:
        try:
            self.call(self.server.stop(), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_run(count: int) -> int:
    """A first port of `count` consecutive free ones (`kubellm up --port P` puts its engines on P+1, P+2, ...).
    Searched below the kernel's ephemeral range, where client sockets of other tests cannot take them meanwhile."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000 - count)
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports found")


def http_get(url: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class ServeProcess:
    """`kubellm serve` as a subprocess (what a pod runs)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"kubellm-serve-{self.port}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115
        cmd = [sys.executable, "-m", "kubellm.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 300) -> ServeProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kubellm serve exited {self.proc.returncode}:\n{self.log()}")
            try:
                if http_get(self.url + "/health", timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"kubellm serve not ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-5000:]

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log.close()


def metric_value(text: str, name: str) -> float:
    """The value of the first sample of metric `name` (labelled `name{...}`) in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


async def wait_until_streams_run_together(
    url: str, model: str, streams: int, at_least: int, timeout: float = 180.0
) -> int:
    """Open `streams` completion streams at once, each far too long to finish while the others arrive, and poll
    the engine's running gauge (deadline `timeout`) until at least `at_least` run together; then disconnect them
    all and wait until their KV blocks are freed. Returns the most seen running. Whether the engine batches is
    thus judged without depending on how fast a loaded machine sends the requests or scrapes the metrics."""
    import aiohttp

    from kubellm import metric_names as mn

    body = {"model": model, "max_tokens": 2000, "stream": True, "ignore_eos": True}

    async def metrics(s: aiohttp.ClientSession) -> str:
        async with s.get(url + "/metrics") as r:
            return await r.text()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def stream(i: int) -> None:
            async with s.post(url + "/v1/completions", json={**body, "prompt": f"Story {i}: once upon"}) as r:
                assert r.status == 200, await r.text()
                async for _ in r.content:
                    pass
            raise AssertionError(f"stream {i} ended before {at_least} streams ran together")

        tasks = [asyncio.ensure_future(stream(i)) for i in range(streams)]
        seen, deadline = 0, time.monotonic() + timeout
        try:
            while seen < at_least:
                for t in tasks:
                    if t.done():
                        t.result()  # a refused or finished stream fails here, naming why
                assert time.monotonic() < deadline, f"at most {seen} of {streams} streams ran together"
                seen = max(seen, int(metric_value(await metrics(s), mn.NUM_REQUESTS_RUNNING)))
                await asyncio.sleep(0.05)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        while metric_value(await metrics(s), mn.KV_CACHE_BLOCKS_USED) > 0:
            assert time.monotonic() < deadline + 60, "KV blocks not freed after the streams disconnected"
            await asyncio.sleep(0.05)
    return seen
