"""`kubellm router --workers N`: N processes on one port, one /metrics view, a dead worker restarted."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import re
import signal
import socket
import sys
import time

import aiohttp
import psutil
import pytest
from router_fake_engine import FakeEngine

from kubellm import metric_names as mn
from kubellm.router.metrics import RouterMetrics, merge_snapshots, render_merged
from kubellm.router.workers import cgroup_cpu_limit, default_workers

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def test_cgroup_cpu_limit_reads_v2_and_v1_quotas():
    assert cgroup_cpu_limit("max 100000") is None
    assert cgroup_cpu_limit("150000 100000") == 1.5
    assert cgroup_cpu_limit("200000 100000") == 2.0
    assert cgroup_cpu_limit(quota="-1", period="100000") is None
    assert cgroup_cpu_limit(quota="50000", period="100000") == 0.5
    assert cgroup_cpu_limit("garbage") is None


def test_default_workers_never_exceeds_the_cpus_this_process_may_use():
    n = default_workers()
    assert 1 <= n <= len(os.sched_getaffinity(0))


def test_merged_metrics_add_counters_and_merge_each_gauge_by_its_rule():
    a, b = RouterMetrics(), RouterMetrics()
    a.requests.labels("m", "http://e1", "200").inc(3)
    b.requests.labels("m", "http://e1", "200").inc(4)
    b.requests.labels("m", "http://e2", "200").inc(1)
    a.in_flight.labels("http://e1").set(2)
    b.in_flight.labels("http://e1").set(5)
    a.backend_healthy.labels("http://e1").set(0)
    b.backend_healthy.labels("http://e1").set(1)
    a.kv_event_seq.labels("http://e1").set(-1)
    b.kv_event_seq.labels("http://e1").set(40)
    a.duration.labels("m").observe(0.002)
    b.duration.labels("m").observe(0.2)
    merged = {f.name: f for f in merge_snapshots([a.snapshot(), b.snapshot()])}

    def value(family: str, sample: str, **labels: str) -> float:
        return next(s.value for s in merged[family].samples if s.name == sample and s.labels == labels)

    assert value(mn.ROUTER_REQUESTS, mn.ROUTER_REQUESTS + "_total", model="m", backend="http://e1", code="200") == 7
    assert value(mn.ROUTER_REQUESTS, mn.ROUTER_REQUESTS + "_total", model="m", backend="http://e2", code="200") == 1
    assert value(mn.ROUTER_IN_FLIGHT, mn.ROUTER_IN_FLIGHT, backend="http://e1") == 7  # requests add up
    assert value(mn.ROUTER_BACKEND_HEALTHY, mn.ROUTER_BACKEND_HEALTHY, backend="http://e1") == 1  # any worker
    assert value(mn.ROUTER_KV_EVENT_SEQ, mn.ROUTER_KV_EVENT_SEQ, backend="http://e1") == -1  # the least advanced
    dur = mn.ROUTER_REQUEST_DURATION
    assert value(dur, dur + "_count", model="m") == 2
    assert value(dur, dur + "_bucket", model="m", le="0.0025") == 1
    assert value(dur, dur + "_bucket", model="m", le="0.25") == 2
    text = render_merged([a.snapshot(), b.snapshot()]).decode()
    assert f'{mn.ROUTER_REQUESTS}_total{{backend="http://e1",code="200",model="m"}} 7.0' in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requests_ok(metrics_text: str) -> float:
    pat = rf'^{mn.ROUTER_REQUESTS}_total\{{[^}}]*code="200"[^}}]*\}} ([0-9.e+]+)$'
    return sum(float(v) for v in re.findall(pat, metrics_text, re.MULTILINE))


def snapshot_requests_ok(snapshot: list[dict]) -> float:
    return sum(
        value
        for fam in snapshot
        for name, labels, value in fam["samples"]
        if name == mn.ROUTER_REQUESTS + "_total" and labels.get("code") == "200"
    )


async def _post_fresh(url: str, n: int) -> list[int]:
    """n requests, each on a new connection (the kernel picks a worker per connection)."""
    statuses = []
    for _ in range(n):
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s,
            s.post(url + "/v1/chat/completions", json=CHAT) as r,
        ):
            await r.read()
            statuses.append(r.status)
    return statuses


async def _metrics(url: str) -> str:
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s,
        s.get(url + "/metrics") as r,
    ):
        assert r.status == 200
        return await r.text()


async def _wait_until(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        result = await cond()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_two_workers_share_one_port_one_metrics_view_and_a_dead_worker_comes_back():
    engine = await FakeEngine("e0").start()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kubellm.cli", "router", "--host", "127.0.0.1", "--port", str(port), "--model", "m",
        "--workers", "2", "--backend", engine.url, "--health-interval", "0.3", "--log-level", "warning",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)  # type: ignore[union-attr]
        assert b"listening on" in line and b"2 workers" in line, line
        parent = psutil.Process(proc.pid)
        workers = parent.children()
        assert len(workers) == 2

        assert await _post_fresh(url, 40) == [200] * 40
        assert engine.completed == 40
        # whichever worker answers, /metrics counts all 40
        for _ in range(6):
            assert requests_ok(await _metrics(url)) == 40

        # the supervisor's scrapes of the workers (every second) have caught up with the 40
        sock = next(c.laddr for w in workers for c in w.net_connections(kind="unix") if c.laddr.endswith(".sock"))
        folder = os.path.dirname(sock)

        async def scraped() -> bool:
            total = 0.0
            for path in glob.glob(os.path.join(folder, "scrape-*.json")):
                with open(path) as f:
                    total += snapshot_requests_ok(json.load(f))
            return total == 40

        await _wait_until(scraped, 10, "the supervisor's scrapes to count the 40 requests")

        victim = workers[0]
        victim.send_signal(signal.SIGKILL)  # a crash: its counters are the supervisor's last scrape of it
        victim.wait(5)

        async def replaced() -> list[psutil.Process]:
            live = [c for c in parent.children() if c.pid not in gone and c.status() != psutil.STATUS_ZOMBIE]
            return live if len(live) == 2 else []

        gone = {victim.pid}
        workers = await _wait_until(replaced, 10, "the supervisor to restart the killed worker")

        async def counted(n: int) -> bool:
            return all([requests_ok(await _metrics(url)) == n for _ in range(4)])  # whichever worker answers

        # the killed worker's share stays in the view
        await _wait_until(lambda: counted(40), 10, "the merged view to count all 40 after a worker's crash")
        # requests sent while it restarts and after all succeed (a worker not yet listening gets no connections)
        assert await _post_fresh(url, 30) == [200] * 30
        await _wait_until(lambda: counted(70), 10, "the merged view to count 70")
        # a worker stopped cleanly (SIGTERM) leaves its own final count, newer than any scrape
        survivor = next(w for w in workers if w.pid != victim.pid and w in parent.children())
        survivor.send_signal(signal.SIGTERM)
        survivor.wait(15)
        gone.add(survivor.pid)
        workers = await _wait_until(replaced, 10, "the supervisor to restart the stopped worker")
        await _wait_until(lambda: counted(70), 10, "the merged view to count 70 after a clean stop")
        assert proc.returncode is None
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 15) == 0
        await engine.kill()
    assert not [p for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


async def test_a_port_in_use_is_one_line_not_a_traceback_with_workers():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kubellm.cli", "router", "--host", "127.0.0.1", "--port", str(port),
            "--model", "m", "--workers", "2", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert err.decode().strip().count("\n") == 0 and f"127.0.0.1:{port}" in err.decode() and "--port" in err.decode()


@pytest.mark.parametrize("bad", ["0", "-2", "two"])
def test_workers_flag_refuses_non_positive_counts(bad):
    from kubellm.router.cli import main

    assert main(["--model", "m", "--workers", bad]) == 2


async def test_workers_stop_when_their_supervisor_is_killed():
    """The supervisor holds the port: workers must not outlive it (they would keep serving on a port nobody owns)."""
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kubellm.cli", "router", "--host", "127.0.0.1", "--port", str(port), "--model", "m",
        "--workers", "2", "--log-level", "warning", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    line = await asyncio.wait_for(proc.stdout.readline(), 30)  # type: ignore[union-attr]
    assert b"listening on" in line, line
    workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2
    proc.kill()
    await proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"workers outlived their supervisor: {[p.pid for p in alive]}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # the port is free again


def test_lazy_metric_children_render_as_direct_updates_do():
    """The hot path's counters and histograms count in plain Python and fold into prometheus when read: the text
    equals that of the same updates made directly (bucket edges included: a value on a bound is in that bucket)."""
    lazy, direct = RouterMetrics(), RouterMetrics()
    values = [0.0, 0.001, 0.0010001, 0.003, 0.05, 0.25, 7.0, 400.0]
    for v in values:
        lazy.child(lazy.duration, "m").observe(v)
        direct.duration.labels("m").observe(v)
        lazy.child(lazy.requests, "m", "http://e", "200").inc()
        direct.requests.labels("m", "http://e", "200").inc()
    for r in (0.0, 0.1, 0.55, 1.0):
        lazy.child(lazy.match_ratio).observe(r)
        direct.match_ratio.observe(r)

    def text(m: RouterMetrics) -> list[str]:
        return [ln for ln in m.render().decode().splitlines() if "_created" not in ln]

    assert text(lazy) == text(direct)
    lazy.child(lazy.requests, "m", "http://e", "200").inc(2)  # after a read: counted on top, read again
    direct.requests.labels("m", "http://e", "200").inc(2)
    assert text(lazy) == text(direct)
    assert any(s["samples"] for s in lazy.snapshot() if s["name"] == mn.ROUTER_REQUESTS)
