"""Soak + chaos: the assembled stack under Poisson load while replicas die and the router restarts.

    python bench/soak.py --duration 90                 # CI size (tests/hardening/test_hardening_soak.py)
    python bench/soak.py --duration 600 --write-results  # the published run (bench/results/soak-<date>.*)

Starts 3 `kubellm serve --device sim` replicas (``--device cpu`` for real ones) and `kubellm router` in front,
all on 127.0.0.1 (the same processes `kubellm up --replicas 3 --device sim` starts, but each one owned here so
it can be killed and brought back alone). Load: Poisson arrivals, a mix of streaming / non-streaming chat and
completions, shared system prompts and unique prompts, some clients hanging up mid-stream. Faults: replicas
SIGKILLed and SIGTERMed in turn at random, each brought back on its port; the router restarted once (SIGTERM).

Bounded: stops after --duration seconds of load or --max-requests requests, whichever comes first; every
request has a hang timeout. Exit status 0 only when the zero-counts hold: no request lost before its first
byte (each one either succeeded on a retry or got 503 with Retry-After), every mid-stream failure ended with
an SSE error event, nothing hung, no 5xx other than 503+Retry-After, no KV block held after the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import psutil

if __package__:
    from bench.result_files import host_info, record
else:  # run as `python bench/soak.py`: bench/ itself is on sys.path
    from result_files import host_info, record

MODEL = "soak"
HOST = "127.0.0.1"
WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
    "romeo sierra tango uniform victor whiskey xray yankee zulu river mountain cloud forest ocean desert city"
).split()
KV_USED_RE = re.compile(r"^kubellm:kv_cache_blocks_used\{[^}]*\}\s+([0-9.eE+-]+)", re.M)


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Managed:
    """One `kubellm` child process that can be killed and restarted on the same port."""

    name: str
    args: list[str]
    port: int
    log_dir: Path
    popen: subprocess.Popen | None = None
    starts: int = 0
    rss: dict[int, list[tuple[float, int]]] = field(default_factory=dict)  # pid -> [(t, rss bytes)]

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        """Spawn it (its output goes to a log file)."""
        self.starts += 1
        log = open(self.log_dir / f"{self.name}.log", "a")  # noqa: SIM115 (owned by the child)
        cmd = [sys.executable, "-m", "kubellm.cli", *self.args, "--host", HOST, "--port", str(self.port)]
        self.popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(sig)

    def wait_exit(self, timeout: float) -> int | None:
        """Wait for it to exit; SIGKILL after the timeout."""
        assert self.popen is not None
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(10)

    def sample_rss(self, t: float) -> None:
        if self.alive():
            assert self.popen is not None
            try:
                self.rss.setdefault(self.popen.pid, []).append((t, psutil.Process(self.popen.pid).memory_info().rss))
            except psutil.Error:
                pass


async def wait_healthy(session: aiohttp.ClientSession, proc: Managed, timeout: float) -> None:
    """Poll /health until 200; fail if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited while starting; see {proc.log_dir / (proc.name + '.log')}")
        try:
            async with session.get(proc.url + "/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                if r.status == 200:
                    return
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{proc.name} not healthy within {timeout:.0f}s")


async def kv_blocks_used(session: aiohttp.ClientSession, proc: Managed) -> int | None:
    """`kubellm:kv_cache_blocks_used` from an engine's /metrics (None if unreachable)."""
    try:
        async with session.get(proc.url + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
            text = await r.text()
    except (aiohttp.ClientError, TimeoutError):
        return None
    m = KV_USED_RE.search(text)
    return int(float(m.group(1))) if m else None


# ---------------------------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Result:
    """What happened to one logical request (after client-side retries)."""

    start: float
    end: float = 0.0
    ttfb: float | None = None
    kind: str = ""
    stream: bool = False
    outcome: str = ""  # ok | client_disconnect | rejected_503 | mid_stream_error_event | violation:*
    attempts: int = 0
    failed_before_first_byte: int = 0  # attempts that failed before a byte arrived
    status: int = 0
    detail: str = ""


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_request(rng: random.Random, prefixes: list[str]) -> tuple[str, dict[str, Any], int | None]:
    """(path, body, disconnect after N chunks or None)."""
    shared = rng.random() < 0.6
    system = rng.choice(prefixes) if shared else _words(rng, rng.randint(20, 120))
    user = _words(rng, rng.randint(3, 30))
    stream = rng.random() < 0.6
    max_tokens = rng.randint(4, 48)
    if rng.random() < 0.5:
        path = "/v1/chat/completions"
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "max_tokens": max_tokens,
        }
    else:
        path = "/v1/completions"
        body = {"model": MODEL, "prompt": f"{system}\n{user}", "max_tokens": max_tokens}
    body["stream"] = stream
    if stream and rng.random() < 0.3:
        body["stream_options"] = {"include_usage": True}
    body["temperature"] = rng.choice([0.0, 0.7, 1.0])
    disconnect = rng.randint(1, 3) if stream and max_tokens > 8 and rng.random() < 0.12 else None
    return path, body, disconnect


def is_openai_error(data: Any) -> bool:
    """OpenAI's error shape: {"error": {"message": str, "type": str, ...}}."""
    err = data.get("error") if isinstance(data, dict) else None
    return isinstance(err, dict) and isinstance(err.get("message"), str) and isinstance(err.get("type"), str)


class Load:
    """Poisson load against the router; classifies every request."""

    def __init__(self, base: str, rate: float, hang_timeout: float, seed: int):
        self.base = base
        self.rate = rate
        self.hang_timeout = hang_timeout
        self.rng = random.Random(seed)
        self.prefixes = [_words(random.Random(seed + i), 150) for i in range(6)]
        self.results: list[Result] = []
        self.finish_reasons: Counter[str] = Counter()

    async def one(self, session: aiohttp.ClientSession, path: str, body: dict[str, Any], cut: int | None) -> None:
        res = Result(start=time.monotonic(), kind=path.rsplit("/", 1)[-1], stream=bool(body.get("stream")))
        self.results.append(res)
        deadline = res.start + self.hang_timeout
        try:
            await asyncio.wait_for(self._attempts(session, path, body, cut, res, deadline), self.hang_timeout)
        except TimeoutError:
            res.outcome = "violation:hung"
        res.end = time.monotonic()

    async def _attempts(
        self,
        session: aiohttp.ClientSession,
        path: str,
        body: dict[str, Any],
        cut: int | None,
        res: Result,
        deadline: float,
    ) -> None:
        while True:
            res.attempts += 1
            retry_in = await self._attempt(session, path, body, cut, res)
            if retry_in is None:
                return
            res.failed_before_first_byte += 1
            if res.attempts >= 6 or time.monotonic() + retry_in > deadline - 1:
                if res.outcome == "":
                    res.outcome = "violation:lost_before_first_byte"
                return
            res.outcome = ""
            await asyncio.sleep(retry_in)

    async def _attempt(
        self, session: aiohttp.ClientSession, path: str, body: dict[str, Any], cut: int | None, res: Result
    ) -> float | None:
        """One HTTP attempt; returns seconds to wait before a retry, or None when the request is settled."""
        got_bytes = False
        try:
            async with session.post(self.base + path, json=body) as r:
                res.status = r.status
                if r.status != 200:
                    raw = await r.read()
                    try:
                        data = json.loads(raw)
                    except ValueError:
                        data = None
                    if not is_openai_error(data):
                        res.outcome, res.detail = "violation:error_not_openai_shape", raw[:200].decode(errors="replace")
                        return None
                    retry_after = r.headers.get("Retry-After")
                    if r.status in (503, 429) and retry_after is not None:
                        res.outcome = "rejected_503" if r.status == 503 else "rejected_429"
                        return min(float(retry_after), 2.0) * (0.5 + self.rng.random())
                    res.outcome, res.detail = f"violation:http_{r.status}", raw[:200].decode(errors="replace")
                    return None
                if not body.get("stream"):
                    data = json.loads(await r.read())
                    res.ttfb = time.monotonic() - res.start
                    self.finish_reasons[data["choices"][0].get("finish_reason") or "none"] += 1
                    res.outcome = "ok"
                    return None
                chunks, done, error_event = 0, False, False
                async for line in r.content:
                    got_bytes = True
                    if res.ttfb is None:
                        res.ttfb = time.monotonic() - res.start
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        done = True
                        break
                    event = json.loads(payload)
                    if "error" in event:
                        error_event = is_openai_error(event)
                        continue
                    for ch in event.get("choices") or []:
                        if ch.get("finish_reason"):
                            self.finish_reasons[ch["finish_reason"]] += 1
                    chunks += 1
                    if cut is not None and chunks >= cut:
                        res.outcome = "client_disconnect"
                        r.close()  # hang up mid-stream: the engine must abort it and free its blocks
                        return None
                if done:
                    res.outcome = "ok"
                elif error_event:
                    res.outcome = "mid_stream_error_event"
                else:
                    res.outcome = "violation:stream_cut_without_error_event"
                return None
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
            if got_bytes:
                res.outcome, res.detail = "violation:stream_cut_without_error_event", repr(e)
                return None
            res.outcome, res.detail = "", repr(e)  # router down (restart) or connection dropped: retry
            return 0.2 + 0.3 * self.rng.random()
        except aiohttp.ClientPayloadError as e:
            res.outcome, res.detail = "violation:stream_cut_without_error_event", repr(e)
            return None

    async def run(self, duration: float, max_requests: int) -> float:
        """Poisson arrivals until the duration or the request budget is spent; then wait for stragglers."""
        conn = aiohttp.TCPConnector(limit=0, force_close=False)
        tasks: set[asyncio.Task] = set()
        async with aiohttp.ClientSession(connector=conn) as session:
            t0 = time.monotonic()
            next_at = t0
            sent = 0
            while sent < max_requests and time.monotonic() - t0 < duration:
                next_at += self.rng.expovariate(self.rate)
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                path, body, cut = make_request(self.rng, self.prefixes)
                t = asyncio.create_task(self.one(session, path, body, cut))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                sent += 1
            load_s = time.monotonic() - t0
            if tasks:
                await asyncio.wait(list(tasks), timeout=self.hang_timeout + 5)
        return load_s


# ---------------------------------------------------------------------------------------------------------------
# faults
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Fault:
    kind: str  # SIGKILL | SIGTERM | router_restart
    target: str
    start: float
    end: float = 0.0
    exit_code: int | None = None


class Chaos:
    """One fault at a time: a replica SIGKILLed or SIGTERMed and restarted, or the router restarted (once)."""

    def __init__(self, engines: list[Managed], router: Managed, seed: int, settle_s: float = 2.0):
        self.engines = engines
        self.router = router
        self.rng = random.Random(seed + 1)
        self.settle_s = settle_s
        self.faults: list[Fault] = []

    async def run(self, session: aiohttp.ClientSession, duration: float, interval: float) -> None:
        t0 = time.monotonic()
        kinds = ["SIGKILL", "SIGTERM"]
        router_done = False
        await asyncio.sleep(min(interval, duration * 0.1))
        i = 0
        while time.monotonic() - t0 < duration - interval * 0.5:
            if not router_done and time.monotonic() - t0 > duration * 0.5:
                await self._restart_router(session)
                router_done = True
            else:
                kind = kinds[i % 2] if i < 2 else self.rng.choice(kinds)
                await self._replica_fault(session, self.rng.choice(self.engines), kind)
                i += 1
            await asyncio.sleep(interval * (0.5 + self.rng.random()))

    async def _replica_fault(self, session: aiohttp.ClientSession, eng: Managed, kind: str) -> None:
        f = Fault(kind, eng.name, time.monotonic())
        self.faults.append(f)
        eng.signal(signal.SIGKILL if kind == "SIGKILL" else signal.SIGTERM)
        f.exit_code = await asyncio.to_thread(eng.wait_exit, 30.0)
        await asyncio.sleep(self.rng.uniform(0.5, 3.0))  # the pod's restart delay
        eng.start()
        await wait_healthy(session, eng, 120)
        await asyncio.sleep(self.settle_s)  # the router's health probe re-admits it
        f.end = time.monotonic()

    async def _restart_router(self, session: aiohttp.ClientSession) -> None:
        f = Fault("router_restart", self.router.name, time.monotonic())
        self.faults.append(f)
        self.router.signal(signal.SIGTERM)
        f.exit_code = await asyncio.to_thread(self.router.wait_exit, 60.0)
        self.router.start()
        await wait_healthy(session, self.router, 60)
        await asyncio.sleep(self.settle_s)
        f.end = time.monotonic()


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------
def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _rss_growth(proc: Managed, warmup_s: float) -> list[dict[str, Any]]:
    """Per process instance: RSS after warm-up vs at its last sample (instances that lived long enough)."""
    out = []
    for pid, samples in proc.rss.items():
        if len(samples) < 2:
            continue
        t_first = samples[0][0]
        base = next((s for s in samples if s[0] - t_first >= warmup_s), None)
        if base is None or samples[-1][0] - base[0] < warmup_s:
            continue
        out.append(
            {
                "pid": pid,
                "observed_s": round(samples[-1][0] - base[0], 1),
                "rss_start_mib": round(base[1] / 2**20, 1),
                "rss_end_mib": round(samples[-1][1] / 2**20, 1),
                "growth_mib": round((samples[-1][1] - base[1]) / 2**20, 1),
            }
        )
    return out


def summarize(
    load: Load,
    chaos: Chaos,
    load_s: float,
    kv_after: dict[str, int | None],
    engines: list[Managed],
    router: Managed,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Counts, zero-count checks and latency figures."""
    results = load.results
    outcomes = Counter(r.outcome for r in results)
    windows = [(f.start, f.end or time.monotonic()) for f in chaos.faults]

    def in_fault(r: Result) -> bool:
        return any(a <= r.end and r.start <= b for a, b in windows)

    lat_fault = sorted(r.end - r.start for r in results if r.outcome == "ok" and in_fault(r))
    lat_calm = sorted(r.end - r.start for r in results if r.outcome == "ok" and not in_fault(r))
    ttfb_fault = sorted(r.ttfb for r in results if r.outcome == "ok" and r.ttfb is not None and in_fault(r))
    ttfb_calm = sorted(r.ttfb for r in results if r.outcome == "ok" and r.ttfb is not None and not in_fault(r))
    bfb = [r for r in results if r.failed_before_first_byte]
    violations = {k: v for k, v in outcomes.items() if k.startswith("violation:")}
    kv_held = sum(v for v in kv_after.values() if v is not None)
    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    fault_counts = Counter(f.kind for f in chaos.faults)
    summary = {
        "config": {
            "duration_s": args.duration,
            "max_requests": args.max_requests,
            "rate_rps": args.rate,
            "replicas": args.replicas,
            "device": args.device,
            "fault_interval_s": args.fault_interval,
            "hang_timeout_s": args.hang_timeout,
            "seed": args.seed,
        },
        "load_seconds": round(load_s, 1),
        "sent": len(results),
        "achieved_rps": round(len(results) / load_s, 2) if load_s else 0,
        "succeeded": outcomes["ok"],
        "client_disconnects": outcomes["client_disconnect"],
        "failed_before_first_byte": {
            "requests": len(bfb),
            "recovered_by_retry": sum(1 for r in bfb if r.outcome in ("ok", "client_disconnect")),
            "answered_503_retry_after": outcomes["rejected_503"] + outcomes["rejected_429"],
            "lost": outcomes["violation:lost_before_first_byte"],
        },
        "failed_mid_stream": {
            "with_sse_error_event": outcomes["mid_stream_error_event"],
            "cut_without_error_event": outcomes["violation:stream_cut_without_error_event"],
        },
        "hung": outcomes["violation:hung"],
        "violations": violations,
        "violation_examples": [asdict(r) for r in results if r.outcome.startswith("violation:")][:5],
        "finish_reasons": dict(load.finish_reasons),
        "kv_blocks_held_after": kv_after,
        "kv_blocks_held_total": kv_held,
        "faults": {
            "SIGKILL": fault_counts["SIGKILL"],
            "SIGTERM": fault_counts["SIGTERM"],
            "router_restart": fault_counts["router_restart"],
            "list": [
                {
                    **asdict(f),
                    "start": round(f.start - results[0].start, 1) if results else 0,
                    "end": round(f.end - results[0].start, 1) if results else 0,
                }
                for f in chaos.faults
            ],
        },
        "latency_ms": {
            "during_faults": {
                "n": len(lat_fault),
                "p50": ms(_pct(lat_fault, 50)),
                "p99": ms(_pct(lat_fault, 99)),
                "ttfb_p50": ms(_pct(ttfb_fault, 50)),
                "ttfb_p99": ms(_pct(ttfb_fault, 99)),
            },
            "outside_faults": {
                "n": len(lat_calm),
                "p50": ms(_pct(lat_calm, 50)),
                "p99": ms(_pct(lat_calm, 99)),
                "ttfb_p50": ms(_pct(ttfb_calm, 50)),
                "ttfb_p99": ms(_pct(ttfb_calm, 99)),
            },
        },
        "rss": {
            "router": _rss_growth(router, args.rss_warmup),
            "engines": {e.name: _rss_growth(e, args.rss_warmup) for e in engines},
        },
    }
    ok = (
        not violations
        and kv_held == 0
        and all(v is not None for v in kv_after.values())
        and fault_counts["SIGKILL"] >= 1
        and fault_counts["SIGTERM"] >= 1
        and fault_counts["router_restart"] >= 1
    )
    summary["passed"] = ok
    return summary


def to_markdown(s: dict[str, Any], host: dict[str, Any]) -> str:
    """A short human-readable report."""
    b, m, lat = s["failed_before_first_byte"], s["failed_mid_stream"], s["latency_ms"]
    rows = [
        (
            "load held",
            f"{s['achieved_rps']} req/s for {s['load_seconds']} s (Poisson, target {s['config']['rate_rps']})",
        ),
        ("requests sent", s["sent"]),
        ("succeeded", s["succeeded"]),
        ("client hang-ups mid-stream (on purpose)", s["client_disconnects"]),
        ("failed before first byte → recovered by retry", f"{b['recovered_by_retry']} of {b['requests']}"),
        ("answered 503/429 + Retry-After", b["answered_503_retry_after"]),
        ("lost before first byte", b["lost"]),
        ("failed mid-stream, ended with SSE error event", m["with_sse_error_event"]),
        ("failed mid-stream without error event", m["cut_without_error_event"]),
        ("hung past the timeout", s["hung"]),
        ("KV blocks held after the run", s["kv_blocks_held_total"]),
        (
            "faults survived",
            f"{s['faults']['SIGKILL']} SIGKILL, {s['faults']['SIGTERM']} SIGTERM, "
            f"{s['faults']['router_restart']} router restart",
        ),
        ("violations", s["violations"] or "none"),
    ]
    lines = [
        f"# Soak: {s['config']['replicas']} × `kubellm serve --device {s['config']['device']}` + router, "
        f"{s['load_seconds']} s",
        "",
        f"Host: {host['cpus']} CPUs ({host['machine']}), Python {host['python']}, {host['when']}. "
        f"Command: `{host['command']}`. Result: **{'PASS' if s['passed'] else 'FAIL'}**.",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        "| latency (ms, successful requests) | n | p50 | p99 | TTFB p50 | TTFB p99 |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("during_faults", "outside_faults"):
        x = lat[name]
        lines.append(
            f"| {name.replace('_', ' ')} | {x['n']} | {x['p50']} | {x['p99']} | {x['ttfb_p50']} | {x['ttfb_p99']} |"
        )
    lines += ["", "RSS growth after warm-up, per process instance (MiB):", ""]
    for r in s["rss"]["router"]:
        lines.append(f"- router pid {r['pid']}: {r['rss_start_mib']} → {r['rss_end_mib']} over {r['observed_s']} s")
    for name, insts in s["rss"]["engines"].items():
        for r in insts:
            lines.append(f"- {name} pid {r['pid']}: {r['rss_start_mib']} → {r['rss_end_mib']} over {r['observed_s']} s")
    lines += ["", f"Finish reasons: {s['finish_reasons']}", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------
async def soak(args: argparse.Namespace) -> dict[str, Any]:
    """Start the stack, run load and chaos side by side, check what is left, stop everything."""
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="kubellm-soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    serve_extra = ["--shutdown-grace-period", str(args.grace), "--max-num-seqs", "64"]
    engines = [
        Managed(
            f"engine-{i}",
            ["serve", "--device", args.device, "--served-model-name", MODEL, *serve_extra],
            free_port(),
            log_dir,
        )
        for i in range(args.replicas)
    ]
    router_args = [
        "router",
        "--model",
        MODEL,
        "--health-interval",
        "0.5",
        "--unhealthy-threshold",
        "1",
        "--breaker-cooldown",
        "2",
        "--queue-timeout",
        "5",
        "--max-retries",
        "3",
    ]
    for e in engines:
        router_args += ["--backend", e.url]
    router = Managed("router", router_args, free_port(), log_dir)
    procs = [*engines, router]
    stop_sampling = asyncio.Event()
    phases: dict[str, float] = {}
    t_begin = time.monotonic()
    try:
        async with aiohttp.ClientSession() as session:
            for e in engines:
                e.start()
            for e in engines:
                await wait_healthy(session, e, 300)
            router.start()
            await wait_healthy(session, router, 60)
            await asyncio.sleep(1.0)
            phases["startup_s"] = round(time.monotonic() - t_begin, 1)

            async def sample() -> None:
                while not stop_sampling.is_set():
                    t = time.monotonic()
                    for p in procs:
                        p.sample_rss(t)
                    try:
                        await asyncio.wait_for(stop_sampling.wait(), 2.0)
                    except TimeoutError:
                        pass

            sampler = asyncio.create_task(sample())
            load = Load(router.url, args.rate, args.hang_timeout, args.seed)
            chaos = Chaos(engines, router, args.seed)
            chaos_task = asyncio.create_task(chaos.run(session, args.duration, args.fault_interval))
            load_s = await load.run(args.duration, args.max_requests)
            t_load_end = time.monotonic()
            await chaos_task  # the last fault finishes (replica back) before the checks
            phases["last_fault_tail_s"] = round(time.monotonic() - t_load_end, 1)
            stop_sampling.set()
            await sampler
            # Every request is settled; give each engine a moment to finish aborting what it was told to.
            kv_after: dict[str, int | None] = {}
            deadline = time.monotonic() + 15
            while True:
                kv_after = {e.name: await kv_blocks_used(session, e) for e in engines}
                if all(v == 0 for v in kv_after.values()) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
    finally:
        t_stop = time.monotonic()
        for p in [router, *engines]:
            p.signal(signal.SIGTERM)
        for p in [router, *engines]:
            if p.popen is not None:
                await asyncio.to_thread(p.wait_exit, 30.0)
        phases["shutdown_s"] = round(time.monotonic() - t_stop, 1)
    summary = summarize(load, chaos, load_s, kv_after, engines, router, args)
    summary["log_dir"] = str(log_dir)
    summary["phases"] = {**phases, "total_s": round(time.monotonic() - t_begin, 1)}
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=90.0, help="seconds of load (default 90)")
    p.add_argument("--max-requests", type=int, default=20000, help="request budget (default 20000)")
    p.add_argument("--rate", type=float, default=12.0, help="Poisson arrival rate, requests/s (default 12)")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--device", default="sim", choices=["sim", "cpu", "cuda"], help="engine device (default sim)")
    p.add_argument("--fault-interval", type=float, default=12.0, help="mean seconds between faults (default 12)")
    p.add_argument("--grace", type=float, default=3.0, help="engines' --shutdown-grace-period (default 3)")
    p.add_argument("--hang-timeout", type=float, default=30.0, help="a request past this has hung (default 30)")
    p.add_argument("--rss-warmup", type=float, default=10.0, help="seconds before the RSS baseline (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default=None, help="where child logs go (default: a temp dir)")
    p.add_argument("--json-out", default=None, help="write the summary JSON here")
    p.add_argument("--write-results", action="store_true", help="write bench/results/soak-<date>.json/.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = asyncio.run(soak(args))
    now = datetime.now(UTC)
    host = host_info("bench/soak.py", argv, now)
    print(record("soak", summary, host, to_markdown, args.json_out, args.write_results, now))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
