"""Router benchmark: routing quality on simulated replicas, and the router's own overhead.

    python bench/router.py overhead            # added latency at a fixed rate + max requests/s (instant backend)
    python bench/router.py routing             # multi-turn chat + uniform prompts on 4 `kubellm serve --device sim`
    python bench/router.py tokenize            # the event loop's CPU per 700-word prompt, inline vs offloaded
    python bench/router.py cpu --engines 8     # router CPU per request, paired rounds against sglang-router
    python bench/router.py all

Every contender runs as its own process against the same backends: our router (`kubellm router`) under each
policy, and sglang-router 0.3.2 (`cache_aware`, PyPI `sglang-router`) when installed. Results go to
bench/results/router-<date>.json and .md, with the hardware they ran on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
PY = sys.executable


# ---------------------------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    name: str
    url: str
    popen: subprocess.Popen
    children: list[Proc] = field(default_factory=list)
    peers: list[Proc] = field(default_factory=list)  # more replicas of the same router (active-active)

    @property
    def urls(self) -> list[str]:
        return [self.url, *(p.url for p in self.peers)]

    def stop(self) -> None:
        for c in [*self.children, *self.peers]:
            c.stop()
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def spawn(
    name: str, cmd: list[str], url: str, health: str = "/health", timeout: float = 300.0, cwd: Path = REPO
) -> Proc:
    log = open(f"/tmp/bench-router-{name}.log", "w")  # noqa: SIM115 (lives as long as the process)
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)
    deadline = time.monotonic() + timeout
    import urllib.request

    while True:
        if p.poll() is not None:
            raise RuntimeError(f"{name} exited with {p.returncode}; see /tmp/bench-router-{name}.log")
        try:
            with urllib.request.urlopen(url + health, timeout=1) as r:
                if r.status == 200:
                    return Proc(name, url, p)
        except OSError:
            pass
        if time.monotonic() > deadline:
            p.kill()
            raise RuntimeError(f"{name} did not become healthy in {timeout:.0f}s")
        time.sleep(0.2)


def our_router(
    backends: list[str],
    policy: str,
    extra: list[str] | None = None,
    model: str = "m",
    core: int | None = None,
    python: str = PY,
) -> Proc:
    port = free_port()
    cmd = [python, "-m", "kubellm.cli", "router", "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
           "--model", model, "--log-level", "warning"]  # fmt: skip
    for b in backends:
        cmd += ["--backend", b]
    extra = list(extra or [])
    if python == PY and "--workers" not in extra:
        extra += ["--workers", "1"]  # one process per router unless a contender says otherwise (comparable rows)
    # Another interpreter's router must not start in this checkout: `python -m` puts the working directory first
    # on sys.path, and this checkout's kubellm/ would shadow the one that interpreter has installed.
    cwd = REPO if python == PY else Path(tempfile.gettempdir())
    return spawn(f"router-{policy}", pinned(cmd + extra, core), f"http://127.0.0.1:{port}", cwd=cwd)


def router_pair(backends: list[str], model: str) -> Proc:
    """Two replicas of our router (one worker each) in front of the same engines, as two pods behind a Service."""
    first = our_router(backends, "prefix", ["--workers", "1", "--debug-headers"], model)
    first.peers.append(our_router(backends, "prefix", ["--workers", "1", "--debug-headers"], model))
    return first


def sglang_router(
    backends: list[str], policy: str = "cache_aware", strip: bool = False, core: int | None = None
) -> Proc | None:
    try:
        import sglang_router  # noqa: F401
    except ImportError:
        return None
    shims: list[Proc] = []
    if strip:
        for i, b in enumerate(backends):
            sp = free_port()
            shims.append(spawn(f"shim{i}", [PY, __file__, "_strip", "--port", str(sp), "--upstream", b],
                               f"http://127.0.0.1:{sp}"))  # fmt: skip
        backends = [s.url for s in shims]
    port = free_port()
    cmd = [PY, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
           "--worker-urls", *backends, "--log-level", "warn", "--disable-retries",
           "--prometheus-port", str(free_port())]  # fmt: skip
    proc = spawn(f"sglang-{policy}", pinned(cmd, core), f"http://127.0.0.1:{port}", health="/health", timeout=60)
    proc.children = shims
    return proc


SGLANG_ONLY_FIELDS = ("no_stop_trim", "separate_reasoning", "stream_reasoning", "return_hidden_states",
                      "skip_special_tokens", "continue_final_message", "logprobs")  # fmt: skip


def run_strip_shim(port: int, upstream: str) -> None:
    """sglang-router re-serializes requests with SGLang-only fields that our engines (OpenAI-strict) reject:
    this pass-through drops them. It sits only on sglang-router's path and adds ~0.3 ms per request there."""
    from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

    async def forward(request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        for k in SGLANG_ONLY_FIELDS:
            body.pop(k, None)
        session: ClientSession = request.app["session"]
        async with session.post(upstream + request.path, json=body) as up:
            resp = web.StreamResponse(status=up.status, headers={"Content-Type": up.headers.get("Content-Type", "")})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    async def passthrough(request: web.Request) -> web.Response:
        async with request.app["session"].get(upstream + request.path) as up:
            return web.Response(status=up.status, body=await up.read(), content_type="application/json")

    async def on_startup(app: web.Application) -> None:
        app["session"] = ClientSession(connector=TCPConnector(limit=0), timeout=ClientTimeout(total=None))

    app = web.Application()
    app.on_startup.append(on_startup)
    app.router.add_post("/v1/chat/completions", forward)
    app.router.add_post("/v1/completions", forward)
    for path in ("/health", "/v1/models", "/metrics", "/get_model_info", "/get_server_info"):
        app.router.add_get(path, passthrough)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def hardware() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
    except OSError:
        return "unknown"
    return head + (" (with uncommitted changes)" if dirty else "")


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


# ---------------------------------------------------------------------------------------------------------------
# overhead: an instant fake engine, called directly and through each router, each router pinned to one core
# ---------------------------------------------------------------------------------------------------------------
ROUTER_CORE, HARNESS_CORE = 0, 1  # the router under test on one core; load generator and fake engine on the other


def pinned(cmd: list[str], core: int | None) -> list[str]:
    return ["taskset", "-c", str(core), *cmd] if core is not None else cmd


def overhead_bodies(n: int, stream: bool, seed: int = 0) -> list[bytes]:
    """n chat requests of ~2 kB: a ~1 kB system prompt shared by all, a ~1 kB user turn unique to each."""
    rng = random.Random(seed)
    system = words(rng, 170)
    out = []
    for _ in range(n):
        body: dict[str, Any] = {"model": "m", "max_tokens": 16,
                                "messages": [{"role": "system", "content": system},
                                             {"role": "user", "content": words(rng, 170)}]}  # fmt: skip
        if stream:
            body["stream"] = True
        out.append(json.dumps(body).encode())
    return out


def cpu_seconds(proc: Proc | None) -> float:
    """User + system CPU seconds of a contender's process tree (workers included)."""
    import psutil

    if proc is None:
        return 0.0
    try:
        root = psutil.Process(proc.popen.pid)
        total = 0.0
        for p in [root, *root.children(recursive=True)]:
            t = p.cpu_times()
            total += t.user + t.system
        return total
    except psutil.Error:
        return float("nan")


def core_times(core: int) -> list[int] | None:
    """The core's cumulative time in /proc/stat (user, nice, system, idle, iowait, irq, softirq, steal), in ticks;
    None where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith(f"cpu{core} "):
                    return [int(x) for x in line.split()[1:9]]
    except OSError:
        pass
    return None


def core_split(before: list[int] | None, after: list[int] | None) -> dict[str, float]:
    """Shares of a core's time between two core_times readings: user (with nice), system, softirq (with irq), idle
    (with iowait) and steal (taken by the hypervisor for other guests)."""
    if before is None or after is None:
        return {}
    d = [a - b for a, b in zip(after, before, strict=True)]
    total = sum(d) or 1
    return {"user": (d[0] + d[1]) / total, "system": d[2] / total, "softirq": (d[5] + d[6]) / total,
            "idle": (d[3] + d[4]) / total, "steal": d[7] / total}  # fmt: skip


def tcp_segments() -> int | None:
    """The host's TCP segments sent so far (/proc/net/snmp OutSegs: data and pure ACKs, every leg on lo alike);
    None where there is no /proc/net/snmp."""
    try:
        with open("/proc/net/snmp") as f:
            rows = [line.split() for line in f if line.startswith("Tcp:")]
        return int(rows[1][rows[0].index("OutSegs")])
    except (OSError, IndexError, ValueError):
        return None


def run_load(host: str, port: int, work: Any) -> Any:
    """Run work(client) on a fresh event loop (uvloop when installed) with a fresh connection pool."""
    from router_load import LoadClient

    async def go() -> Any:
        client = LoadClient(host, port)
        try:
            return await work(client)
        finally:
            client.close()

    try:
        import uvloop

        return uvloop.run(go())
    except ImportError:
        return asyncio.run(go())


@dataclass
class Contender:
    name: str
    start: Any  # () -> Proc | None; None: call the engine directly
    latency: bool = True  # measure latency (a pinned, comparable contender) or throughput only


def bench_overhead(args: argparse.Namespace) -> dict[str, Any]:
    from router_load import closed_loop, fixed_rate  # bench/ is on sys.path (run as a script)

    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("the overhead benchmark pins the router to one core and the harness to another: needs 2")
    os.sched_setaffinity(0, {HARNESS_CORE})  # this process is the load generator
    fakes: list[Proc] = []
    for i in range(args.engines):
        port = free_port()
        fakes.append(spawn(f"instant{i}", pinned([PY, __file__, "_instant", "--port", str(port)], HARNESS_CORE),
                           f"http://127.0.0.1:{port}"))  # fmt: skip
    engine = fakes[0]  # direct calls and the byte relay go to this one
    plain, streamed = overhead_bodies(1000, False), overhead_bodies(1000, True, seed=1)
    rate, srate, duration = args.rate or 500.0, args.stream_rate, args.duration
    results: dict[str, Any] = {
        "workload": f"POST /v1/chat/completions, 1000 distinct ~2 kB bodies (shared ~1 kB system prompt + unique "
        f"~1 kB user turn), instant fake engine (bench/router_load.py); latency: {rate:g} req/s open loop for "
        f"{duration:g}s over kept-alive connections; streaming: {args.stream_rate:g} req/s for {duration:g}s, "
        "4 SSE chunks 2 ms apart, time to first chunk; max req/s: closed loop, 64 connections, "
        f"{args.max_duration:g}s. "
        f"Router pinned to core {ROUTER_CORE} (taskset), load generator and fake engine on core {HARNESS_CORE}; "
        "kubellm with --kv-events off (the fake has no event stream), prefix policy, text-block hashing "
        "(the fake serves no tokenizer); "
        + ("one fake engine behind every router (a one-replica pick: routing cost grows with replicas). "
           if args.engines == 1 else
           f"{args.engines} fake engines (separate processes) behind every router, so each request is a real pick "
           "among them; direct calls and the byte relay go to the first. ")
        + "All contenders start first, then the repeats go round-robin over them.",
        "engines": args.engines,
        "rows": {},
    }  # fmt: skip
    b = [f.url for f in fakes]

    def relay() -> Proc:
        rp = free_port()
        cmd = pinned([PY, __file__, "_relay", "--port", str(rp), "--upstream", engine.url], ROUTER_CORE)
        return spawn("relay", cmd, f"http://127.0.0.1:{rp}")

    contenders = [Contender("direct", None), Contender("byte relay (floor: uvloop, no HTTP, no routing)", relay)]
    contenders.append(Contender("kubellm prefix", lambda: our_router(
        b, "prefix", ["--kv-events", "off", "--workers", "1"], core=ROUTER_CORE)))  # fmt: skip
    for extra in args.router_arg or []:  # variants of our prefix router, e.g. "--text-block-chars 64"
        contenders.append(Contender(f"kubellm prefix {extra}", lambda x=extra: our_router(
            b, "prefix", ["--kv-events", "off", "--workers", "1", *x.split()], core=ROUTER_CORE)))  # fmt: skip
    for spec in args.baseline_python or []:
        label, _, python = spec.rpartition("=")
        name = f"kubellm prefix (before{': ' + label if label else ''})"
        contenders.append(Contender(name, lambda py=python: our_router(
            b, "prefix", ["--kv-events", "off"], core=ROUTER_CORE, python=py)))  # fmt: skip
    if not args.no_sglang:
        contenders.append(Contender("sglang-router cache_aware", lambda: sglang_router(b, core=ROUTER_CORE)))
    contenders.append(Contender("kubellm prefix --workers 2 (unpinned)", lambda: our_router(
        b, "prefix", ["--kv-events", "off", "--workers", "2"]), latency=False))  # fmt: skip
    if args.only:
        contenders = [c for c in contenders if c.name == "direct" or any(o in c.name for o in args.only)]
    procs: dict[str, Proc | None] = {}
    try:
        # every contender up first, then the repeats round-robin over them: a shared machine's load drifts over
        # minutes, and interleaving spreads that drift over all contenders instead of favouring whoever ran when
        # it was quiet
        for c in contenders:
            procs[c.name] = c.start() if c.start else None
            if c.start and procs[c.name] is None:
                del procs[c.name]  # (sglang-router not installed)
        for rep in range(args.repeats):
            # direct first; the others in an order rotated each repeat (whoever ran right after direct's
            # 20k-req/s closed loop ran slower in run 7, whatever its code)
            rest = contenders[1:]
            shift = rep % len(rest) if rest else 0
            for c in [contenders[0], *rest[shift:], *rest[:shift]]:
                if c.name not in procs:
                    continue
                proc = procs[c.name]
                url = proc.url if proc else engine.url
                host, port_s = url.removeprefix("http://").split(":")
                row: dict[str, Any] = results["rows"].setdefault(c.name, {})
                if c.latency:
                    lat = run_load(host, int(port_s), lambda cl: fixed_rate(cl, plain, rate, duration))
                    st = run_load(host, int(port_s), lambda cl: fixed_rate(cl, streamed, srate, duration))
                    row.setdefault("p50_ms", []).append(pct([t.total for t in lat], 50) * 1e3)
                    row.setdefault("p99_ms", []).append(pct([t.total for t in lat], 99) * 1e3)
                    row.setdefault("n", []).append(len(lat))
                    row.setdefault("ttfc_p50_ms", []).append(pct([t.first_byte for t in st], 50) * 1e3)
                    row.setdefault("ttfc_p99_ms", []).append(pct([t.first_byte for t in st], 99) * 1e3)
                    row.setdefault("stream_total_p50_ms", []).append(pct([t.total for t in st], 50) * 1e3)
                cpu0 = cpu_seconds(proc)
                cores0, segs0 = (core_times(ROUTER_CORE), core_times(HARNESS_CORE)), tcp_segments()
                rps = run_load(host, int(port_s), lambda cl: closed_loop(cl, plain, 64, args.max_duration))
                cores1, segs1 = (core_times(ROUTER_CORE), core_times(HARNESS_CORE)), tcp_segments()
                row.setdefault("max_rps", []).append(rps)
                # What the closed loop is bound by: the router core's busy time per request (user, system AND the
                # softirq that its sends cost there, which the process's CPU times leave out), and how idle the
                # harness core was (a harness that kept the router waiting shows here); both cores alike for
                # every contender, so nothing here favours one
                split, harness = core_split(cores0[0], cores1[0]), core_split(cores0[1], cores1[1])
                n = max(1.0, rps * args.max_duration)
                if split and proc is not None:
                    busy = 1.0 - split["idle"] - split["steal"]
                    row.setdefault("core_us_per_req", []).append(busy * args.max_duration * 1e6 / n)
                    row.setdefault("core_softirq_share", []).append(split["softirq"])
                if harness:
                    row.setdefault("harness_idle", []).append(harness["idle"])
                if segs0 is not None and segs1 is not None:
                    row.setdefault("tcp_segs_per_req", []).append((segs1 - segs0) / n)
                if proc is not None:  # CPU per request: a figure other users of a shared machine disturb less
                    cpu_ms = (cpu_seconds(proc) - cpu0) * 1e3 / max(1.0, rps * args.max_duration)
                    row.setdefault("cpu_ms_per_req", []).append(cpu_ms)
                print(f"{c.name:40s} rep {rep}: " + "  ".join(f"{k} {v[-1]:.3f}" for k, v in row.items()),
                      flush=True)  # fmt: skip
    finally:
        for proc in procs.values():
            if proc:
                proc.stop()
        for f in fakes:
            f.stop()
    summarize_overhead(results)
    return results


def bench_cpu(args: argparse.Namespace) -> dict[str, Any]:
    """Router CPU per request, paired: every contender pinned to the same core and started first, then short
    closed-loop rounds rotated over them, so each round of one contender has a neighbour of every other measured
    under the same background load; the paired ratios (per round, then their median) cancel the shared machine's
    drift, which the overhead mode's few long repeats cannot."""
    from router_load import closed_loop

    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("the cpu benchmark pins the routers to one core and the harness to another: needs 2")
    os.sched_setaffinity(0, {HARNESS_CORE})
    fakes = []
    for i in range(args.engines):
        port = free_port()
        fakes.append(spawn(f"cpu-instant{i}", pinned([PY, __file__, "_instant", "--port", str(port)], HARNESS_CORE),
                           f"http://127.0.0.1:{port}"))  # fmt: skip
    b = [f.url for f in fakes]
    plain = overhead_bodies(1000, False)
    flags = ["--kv-events", "off", "--workers", "1"]
    starts: dict[str, Any] = {
        "kubellm prefix": lambda: our_router(b, "prefix", flags, core=ROUTER_CORE),
        "kubellm round_robin": lambda: our_router(b, "round_robin", flags, core=ROUTER_CORE),
    }
    for extra in args.router_arg or []:  # variants of our prefix router, e.g. "--text-block-chars 64"
        starts[f"kubellm prefix {extra}"] = lambda x=extra: our_router(b, "prefix", flags + x.split(), core=ROUTER_CORE)
    for spec in args.baseline_python or []:
        label, _, python = spec.rpartition("=")
        starts[f"kubellm prefix (before{': ' + label if label else ''})"] = lambda py=python: our_router(
            b, "prefix", flags, core=ROUTER_CORE, python=py
        )
    if not args.no_sglang:
        starts["sglang-router cache_aware"] = lambda: sglang_router(b, core=ROUTER_CORE)
    if args.only:
        starts = {n: s for n, s in starts.items() if any(o in n for o in args.only)}
    procs = {name: p for name, start in starts.items() if (p := start()) is not None}
    cpu: dict[str, list[float]] = {n: [] for n in procs}
    rps: dict[str, list[float]] = {n: [] for n in procs}
    split: dict[str, list[dict[str, float]]] = {n: [] for n in procs}  # the router core's time, per round
    try:
        for proc in procs.values():  # warm: connections, caches, the index filled
            host, port_s = proc.url.removeprefix("http://").split(":")
            run_load(host, int(port_s), lambda cl: closed_loop(cl, plain, 64, 1.0))
        names = list(procs)
        for rnd in range(args.rounds):
            k = rnd % len(names)
            for name in names[k:] + names[:k]:
                proc = procs[name]
                host, port_s = proc.url.removeprefix("http://").split(":")
                c0, t0 = cpu_seconds(proc), core_times(ROUTER_CORE)
                n = run_load(host, int(port_s), lambda cl: closed_loop(cl, plain, 64, args.max_duration))
                cpu[name].append((cpu_seconds(proc) - c0) * 1e3 / max(1.0, n * args.max_duration))
                split[name].append(core_split(t0, core_times(ROUTER_CORE)))
                rps[name].append(n)
            print(f"round {rnd}: " + "  ".join(f"{n} {v[-1]:.3f}" for n, v in cpu.items()), flush=True)
    finally:
        for proc in procs.values():
            proc.stop()
        for f in fakes:
            f.stop()

    def med(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    # the router core's busy µs per request in each round (0.0 where /proc/stat was not readable)
    core_us = {n: [(1.0 - r["idle"] - r["steal"]) * 1e6 / max(1.0, q) if r else 0.0 for r, q in
                   zip(split[n], rps[n], strict=True)] for n in procs}  # fmt: skip

    rows = {n: {"cpu_ms_per_req": med(cpu[n]), "cpu_ms_per_req_min": min(cpu[n]), "max_rps": med(rps[n]),
                "core_us_per_req": med(core_us[n]),
                "cpu_runs": cpu[n], "rps_runs": rps[n], "core_split_runs": split[n],
                "core_split": {k: med([r[k] for r in split[n] if r]) for k in (split[n][0] if split[n] else {})}}
            for n in procs}  # fmt: skip
    paired = {}
    for a in procs:
        for ref in ("sglang-router cache_aware", *(n for n in procs if n.startswith("kubellm prefix (before"))):
            if a != ref and ref in procs and a.startswith("kubellm"):
                ratios = sorted(x / y for x, y in zip(cpu[a], cpu[ref], strict=True))
                paired[f"{a} / {ref}"] = {"median": med(ratios), "min": ratios[0], "max": ratios[-1]}
                # what bounds req/s on the core: its busy time per request (softirq included, which the process's
                # CPU times above leave out), and the req/s themselves, paired the same way
                busy = sorted(x / y for x, y in zip(core_us[a], core_us[ref], strict=True) if x and y)
                if busy:
                    paired[f"{a} / {ref}, router core busy per request"] = {
                        "median": med(busy), "min": busy[0], "max": busy[-1]}  # fmt: skip
                got = sorted(x / y for x, y in zip(rps[a], rps[ref], strict=True))
                paired[f"{a} / {ref}, req/s"] = {"median": med(got), "min": got[0], "max": got[-1]}
    return {
        "workload": f"CPU seconds of each router process per request over closed-loop rounds (64 connections, "
        f"{args.max_duration:g}s each, the overhead mode's 1000 distinct ~2 kB chat bodies), {args.rounds} rounds "
        f"rotated over the contenders, all started (and warmed for 1s) first; {args.engines} instant fake engines; "
        f"routers pinned to core {ROUTER_CORE}, load generator and engines on core {HARNESS_CORE}; kubellm with "
        "--kv-events off and one worker; 'kubellm round_robin' is the same router and code with no prefix work "
        "(no hashing, no index): what the HTTP path alone costs. The router core's time (/proc/stat, median of the "
        "rounds): user, system and softirq (the kernel's network processing, most of it for the router's own "
        "loopback writes), idle, and steal (the hypervisor's other guests).",
        "rows": rows,
        "paired": paired,
    }


def summarize_overhead(results: dict[str, Any]) -> None:
    """Per row: the median of the repeats, and their spread (min-max) beside it; added = minus direct's median."""
    for row in results["rows"].values():
        for k in list(row):
            if isinstance(row[k], list):
                vals = sorted(row[k])
                row[k + "_runs"] = vals
                row[k] = vals[len(vals) // 2]
    direct = results["rows"]["direct"]
    for row in results["rows"].values():
        for k in ("p50_ms", "p99_ms", "ttfc_p50_ms", "ttfc_p99_ms"):
            if k in row:
                row["added_" + k] = row[k] - direct[k]


# ---------------------------------------------------------------------------------------------------------------
# routing quality on simulated replicas
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Conversation:
    system: str
    user_seed: int
    turns_left: int
    history: list[dict[str, str]] = field(default_factory=list)
    busy: bool = False


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


VOCAB = [w for w in re.findall(r"[a-z]+", (Path(__file__).read_text()).lower()) if 2 < len(w) < 12][:2000] or ["x"]


def sample_metric(text: str, name: str) -> float:
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.eE+-]+)$", text, re.MULTILINE):
        total += float(m.group(1))
    return total


async def engine_counters(engines: list[str]) -> tuple[float, float, float, float]:
    """Summed over the engines: prefix cache queries and hits, and the TTFT histogram's sum and count (the
    engine's own TTFT: placement and queueing without the router's and the client's CPU time)."""
    q = h = ttft_sum = ttft_n = 0.0
    async with aiohttp.ClientSession() as s:
        for e in engines:
            async with s.get(e + "/metrics") as r:
                text = await r.text()
            q += sample_metric(text, "vllm:prefix_cache_queries_total")
            h += sample_metric(text, "vllm:prefix_cache_hits_total")
            ttft_sum += sample_metric(text, "vllm:time_to_first_token_seconds_sum")
            ttft_n += sample_metric(text, "vllm:time_to_first_token_seconds_count")
    return q, h, ttft_sum, ttft_n


async def router_decisions(url: str) -> dict[str, float]:
    """Our router's routing decisions by reason (prefix_hit, load_spill, no_match...); {} for other routers."""
    try:
        async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
            text = await r.text()
    except aiohttp.ClientError:
        return {}
    pattern = r'^kubellm_router_routing_decisions_total\{[^}]*reason="([a-z_]+)"[^}]*\} ([0-9.eE+-]+)$'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text, re.MULTILINE)}


async def stream_chat(s: aiohttp.ClientSession, url: str, model: str, messages: list[dict[str, str]],
                      max_tokens: int) -> tuple[float, int, str]:  # fmt: skip
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    t0 = time.perf_counter()
    ttft, n, text = float("nan"), 0, []
    async with s.post(url + "/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
        async for line in r.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            d = json.loads(line[6:])
            delta = (d.get("choices") or [{}])[0].get("delta", {}).get("content")
            if delta:
                if n == 0:
                    ttft = time.perf_counter() - t0
                n += 1
                text.append(delta)
    return ttft, n, "".join(text)


async def route_only(s: aiohttp.ClientSession, url: str, model: str, messages: list[dict[str, str]]) -> str:
    """The replica a router (with --debug-headers) would pick for this request now, without sending it."""
    body = {"model": model, "messages": messages, "max_tokens": 1, "stream": True}
    async with s.post(url + "/v1/chat/completions", json=body, headers={"X-Kubellm-Route-Only": "1"}) as r:
        await r.read()
        return r.headers.get("X-Kubellm-Backend", "")


async def run_workload(urls: str | list[str], engines: list[str], model: str, kind: str, rate: float, seed: int,
                       tenants: int, users: int, turns: int, system_words: int, max_tokens: int,
                       uniform_requests: int, uniform_words: int, nonce: str = "") -> dict[str, Any]:  # fmt: skip
    """Several router URLs: requests go to them in turn (round robin, as a Service spreads connections), and
    before each one both routers are asked where they would send it (their agreement)."""
    urls = [urls] if isinstance(urls, str) else urls
    agree = [0, 0]
    sent = [0]
    rng = random.Random(seed)
    q0, h0, ts0, tn0 = await engine_counters(engines)
    ttfts: list[float] = []
    tokens = 0
    errors = 0
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
        t_start = time.perf_counter()
        tasks: list[asyncio.Task[Any]] = []

        async def send(messages: list[dict[str, str]], conv: Conversation | None) -> None:
            nonlocal tokens, errors
            url = urls[sent[0] % len(urls)]
            sent[0] += 1
            try:
                if len(urls) > 1:
                    picks = await asyncio.gather(*(route_only(s, u, model, messages) for u in urls))
                    agree[0] += len(set(picks)) == 1
                    agree[1] += 1
                ttft, n, text = await stream_chat(s, url, model, messages, max_tokens)
                ttfts.append(ttft)
                tokens += n
                if conv is not None:
                    conv.history += [messages[-1], {"role": "assistant", "content": text}]
            except Exception:
                errors += 1
            finally:
                if conv is not None:
                    conv.busy = False
                    conv.turns_left -= 1

        if kind == "multiturn":
            systems = [f"{nonce} " + words(random.Random(seed * 1000 + t), system_words) for t in range(tenants)]
            convs = [Conversation(systems[t], u, turns) for t in range(tenants) for u in range(users)]
            total = len(convs) * turns
            for _ in range(total):
                await asyncio.sleep(rng.expovariate(rate))
                while True:
                    ready = [c for c in convs if not c.busy and c.turns_left > 0]
                    if ready:
                        break
                    await asyncio.sleep(0.005)
                c = rng.choice(ready)
                c.busy = True
                msgs = [{"role": "system", "content": c.system}, *c.history,
                        {"role": "user", "content": words(rng, 30)}]  # fmt: skip
                tasks.append(asyncio.create_task(send(msgs, c)))
        else:
            total = uniform_requests
            for _ in range(total):
                await asyncio.sleep(rng.expovariate(rate))
                msgs = [{"role": "user", "content": f"{nonce} " + words(rng, uniform_words)}]
                tasks.append(asyncio.create_task(send(msgs, None)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t_start
    q1, h1, ts1, tn1 = await engine_counters(engines)
    decisions: dict[str, float] = {}
    for u in urls:
        for k, v in (await router_decisions(u)).items():
            decisions[k] = decisions.get(k, 0.0) + v
    return {
        **({"decisions": decisions} if decisions else {}),
        **({"agreement": agree[0] / agree[1], "agreement_n": agree[1]} if agree[1] else {}),
        "requests": total,
        "errors": errors,
        "hit_rate": (h1 - h0) / (q1 - q0) if q1 > q0 else float("nan"),
        "ttft_p50_ms": pct(ttfts, 50) * 1e3,
        "ttft_p90_ms": pct(ttfts, 90) * 1e3,
        "ttft_p99_ms": pct(ttfts, 99) * 1e3,
        "engine_ttft_mean_ms": (ts1 - ts0) / (tn1 - tn0) * 1e3 if tn1 > tn0 else float("nan"),
        "output_tok_s": tokens / wall,
        "req_s": total / wall,
        "wall_s": wall,
    }


def start_sim_engines(n: int, extra: list[str]) -> list[Proc]:
    procs: list[Proc] = []
    try:
        for i in range(n):
            port = free_port()
            cmd = [PY, "-m", "kubellm.cli", "serve", "--device", "sim", "--host", "127.0.0.1", "--port", str(port),
                   "--log-level", "warning", *extra]  # fmt: skip
            procs.append(spawn(f"sim{i}", cmd, f"http://127.0.0.1:{port}"))
    except BaseException:
        for p in procs:  # one replica failed to start: leave none of the others running
            p.stop()
        raise
    return procs


def measure_capacity(args: argparse.Namespace, engines: list[Proc]) -> dict[str, Any]:
    """The multi-turn workload offered far above what the fleet serves, under round_robin: the completed
    requests per second are the fleet's capacity, the reference for `--load`."""
    router = our_router([e.url for e in engines], "round_robin", ["--kv-events", "off"], args.model)
    try:
        row = asyncio.run(run_workload(
            router.url, [e.url for e in engines], args.model, "multiturn", args.capacity_rate, args.seed,
            args.tenants, args.users, args.turns, args.system_words, args.max_tokens, args.uniform_requests,
            args.uniform_words, nonce="capacity"))  # fmt: skip
    finally:
        router.stop()
    return row


# The hit-rate reference: the longest cached prefix wins, whatever its length and whatever the load.
ORACLE_ARGS = ["--balance-factor", "1e9", "--prefix-min-match-ratio", "0", "--prefix-min-match-tokens", "0"]


def bench_routing(args: argparse.Namespace) -> dict[str, Any]:
    contenders: list[tuple[str, Any]] = [
        ("round_robin", lambda b: our_router(b, "round_robin", ["--kv-events", "off"], args.model)),
        ("least_load", lambda b: our_router(b, "least_load", ["--kv-events", "off"], args.model)),
        ("prefix approximate", lambda b: our_router(b, "prefix", ["--kv-events", "off"], args.model)),
        ("prefix precise", lambda b: our_router(b, "prefix", [], args.model)),
        ("oracle (longest cached prefix)", lambda b: our_router(b, "prefix", ORACLE_ARGS, args.model)),
    ]
    if not args.no_sglang:
        contenders.append(("sglang-router cache_aware", lambda b: sglang_router(b, strip=True)))
    if args.active_active:
        contenders.append(("prefix precise, 2 router replicas (round robin)", lambda b: router_pair(b, args.model)))
    for extra in args.router_arg or []:  # extra variants of our prefix policy, e.g. "--load-floor 4"
        contenders.append(
            (f"prefix precise {extra}", lambda b, x=extra: our_router(b, "prefix", x.split(), args.model))
        )
    if args.only:
        contenders = [c for c in contenders if any(o in c[0] for o in args.only)]
    out: dict[str, Any] = {}
    if args.engine_arg:
        out["engine_args"] = " ".join(args.engine_arg)
    # One fleet for every contender; each contender's prompts start with its own nonce word, so no contender
    # finds blocks cached by an earlier one (their stale blocks are the first the engines' LRU evicts).
    engines = [] if args.fresh_engines else start_sim_engines(args.replicas, args.engine_arg or [])
    try:
        if args.load:
            out["capacity"] = measure_capacity(args, engines)
            args.rate = args.load * out["capacity"]["req_s"]
            print(f"capacity {out['capacity']['req_s']:.2f} req/s under round_robin; offered {args.rate:.2f} req/s "
                  f"= {args.load:g} of it", flush=True)  # fmt: skip
        kinds = [k for k in ("multiturn", "uniform") if not getattr(args, f"skip_{k}")]
        for kind in kinds:
            desc = (f"{args.tenants} tenants x {args.users} users x {args.turns} turns, {args.system_words}-word "
                    f"system prompts, 30-word user turns, max_tokens {args.max_tokens}, Poisson {args.rate:g} req/s, "
                    f"seed {args.seed}, {args.replicas} sim replicas") if kind == "multiturn" else (
                    f"{args.uniform_requests} requests of {args.uniform_words} random words, max_tokens "
                    f"{args.max_tokens}, Poisson {args.rate:g} req/s, seed {args.seed}, "
                    f"{args.replicas} sim replicas")  # fmt: skip
            if args.load:
                desc += (f" = {args.load:g} x the fleet's capacity under round_robin ({out['capacity']['req_s']:.2f} "
                         "req/s, measured first on the same fleet with the same workload offered at "
                         f"{args.capacity_rate:g} req/s)")  # fmt: skip
            if args.engine_arg:
                desc += f"; engines: kubellm serve --device sim {out['engine_args']}"
            out[kind] = {"workload": desc, "rows": {}}
            for k, (name, start) in enumerate(contenders):
                fleet = start_sim_engines(args.replicas, args.engine_arg or []) if args.fresh_engines else engines
                try:
                    router = start([e.url for e in fleet])
                    if router is None:
                        continue
                    try:
                        row = asyncio.run(run_workload(
                            router.urls, [e.url for e in fleet], args.model, kind, args.rate, args.seed, args.tenants,
                            args.users, args.turns, args.system_words, args.max_tokens, args.uniform_requests,
                            args.uniform_words, nonce=f"{kind}{k}"))  # fmt: skip
                    finally:
                        router.stop()
                finally:
                    if args.fresh_engines:
                        for e in fleet:
                            e.stop()
                out[kind]["rows"][name] = row
                print(f"{kind:9s} {name:32s} hit {row['hit_rate']:.3f}  TTFT p50 {row['ttft_p50_ms']:8.1f} ms  "
                      f"p90 {row['ttft_p90_ms']:8.1f} ms  {row['output_tok_s']:8.0f} tok/s  errors {row['errors']}",
                      flush=True)  # fmt: skip
    finally:
        for e in engines:
            e.stop()
    return out


# ---------------------------------------------------------------------------------------------------------------
# restart: kill the router under load, start it again, time its first routed request and check its index is warm
# ---------------------------------------------------------------------------------------------------------------
def bench_restart(args: argparse.Namespace) -> dict[str, Any]:
    engines = start_sim_engines(2, args.engine_arg or [])
    urls = [e.url for e in engines]
    system = words(random.Random(7), 600)  # ~800 tokens: 50 blocks
    msgs = [{"role": "system", "content": system}]
    port = free_port()
    backends = [x for u in urls for x in ("--backend", u)]
    cmd = [PY, "-m", "kubellm.cli", "router", "--host", "127.0.0.1", "--port", str(port), "--model", args.model,
           "--workers", "1", "--debug-headers", "--log-level", "warning", *backends]  # fmt: skip

    async def post(s: aiohttp.ClientSession, base: str, user: str) -> tuple[int, str, str]:
        body = {"model": args.model, "messages": [*msgs, {"role": "user", "content": user}], "max_tokens": 1}
        async with s.post(base + "/v1/chat/completions", json=body) as r:
            await r.read()
            return r.status, r.headers.get("X-Kubellm-Backend", ""), r.headers.get("X-Kubellm-Route", "")

    async def load(stop: asyncio.Event, out: list[tuple[float, Any]]) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            i = 0
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    out.append((t, (await post(s, f"http://127.0.0.1:{port}", f"load {i}"))[0]))
                except aiohttp.ClientError as e:
                    out.append((t, type(e).__name__))
                i += 1
                await asyncio.sleep(0.01)

    async def cycle(old: Proc) -> tuple[Proc, dict[str, Any]]:
        stop, outcomes = asyncio.Event(), []
        loaders = [asyncio.create_task(load(stop, outcomes)) for _ in range(4)]
        await asyncio.sleep(1.0)
        old.popen.kill()  # SIGKILL under load
        old.popen.wait()
        t0 = time.perf_counter()
        new = await asyncio.to_thread(spawn, "router-restart", cmd, f"http://127.0.0.1:{port}", "/health", 60.0)
        ready = time.perf_counter()
        async with aiohttp.ClientSession() as s:
            status, backend, reason = await post(s, new.url, "first after restart")
        first = time.perf_counter()
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*loaders)
        after = [o for t, o in outcomes if t >= ready]
        return new, {
            "ready_s": ready - t0, "first_routed_s": first - t0, "first_status": status, "first_route": reason,
            "first_to_cache_holder": backend == urls[1], "sent_after_ready": len(after),
            "failed_after_ready": sum(1 for o in after if o != 200),
        }  # fmt: skip

    runs: list[dict[str, Any]] = []
    router: Proc | None = None
    try:

        async def warm() -> None:  # the prompt's prefix lands on engine 1, sent there directly
            async with aiohttp.ClientSession() as s:
                assert (await post(s, urls[1], "hi"))[0] == 200

        asyncio.run(warm())
        router = spawn("router-restart", cmd, f"http://127.0.0.1:{port}", timeout=60)
        for _ in range(args.repeats):
            router, run = asyncio.run(cycle(router))
            runs.append(run)
            print(f"restart: ready {run['ready_s']:.2f}s, first routed {run['first_routed_s']:.2f}s "
                  f"({run['first_route']}), {run['failed_after_ready']}/{run['sent_after_ready']} failed after ready",
                  flush=True)  # fmt: skip
    finally:
        if router is not None:
            router.stop()
        for e in engines:
            e.stop()
    return {"workload": "2 `kubellm serve --device sim` engines, one holding a ~800-token system prompt (sent to it "
            "directly); the router (--workers 1) SIGKILLed under 4 closed-loop clients and started again on the "
            "same port; seconds from spawning the new process (Python start-up included) to /health answering and "
            "to its first routed request with that prompt returning", "runs": runs}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# memory: RSS of the router under a stream of unique ~2 kB prompts
# ---------------------------------------------------------------------------------------------------------------
def bench_memory(args: argparse.Namespace) -> dict[str, Any]:
    import psutil

    n, samples = args.prompts, 20
    port = free_port()
    engine = spawn("instant", [PY, __file__, "_instant", "--port", str(port)], f"http://127.0.0.1:{port}")
    router = our_router([engine.url], "prefix", ["--kv-events", "off", "--workers", "1"])
    rss: list[tuple[int, int]] = []
    host, rport = router.url.removeprefix("http://").split(":")
    rng = random.Random(0)
    try:
        proc = psutil.Process(router.popen.pid)
        rss.append((0, proc.memory_info().rss))
        for k in range(samples):
            bodies = [json.dumps({"model": "m", "max_tokens": 1, "messages": [
                {"role": "user", "content": " ".join(f"{rng.random():.12f}" for _ in range(140))}]}).encode()
                for _ in range(n // samples)]  # fmt: skip
            run_load(host, int(rport), lambda cl, b=bodies: closed_loop_count(cl, b, 32))
            rss.append(((k + 1) * (n // samples), proc.memory_info().rss))
            print(f"memory: {rss[-1][0]:7d} prompts  RSS {rss[-1][1] / 2**20:7.1f} MiB", flush=True)
    finally:
        router.stop()
        engine.stop()
    last = [r for c, r in rss if c >= 0.8 * n]
    mean = sum(last) / len(last)
    return {
        "workload": f"{n} unique ~2 kB chat prompts (140 random decimals each) through one router process "
        "(--workers 1, prefix policy, --kv-events off: the approximate index, default bound 200000 entries, "
        "text-block hashing) to an instant fake engine, 32 connections; RSS sampled every "
        f"{n // samples} prompts",
        "rss_mib": [[c, r / 2**20] for c, r in rss],
        "last_20pct_spread": (max(last) - min(last)) / mean,
        "start_mib": rss[0][1] / 2**20,
        "end_mib": rss[-1][1] / 2**20,
    }


async def closed_loop_count(client: Any, bodies: list[bytes], concurrency: int) -> int:
    """Send every body once over `concurrency` kept-alive connections; returns how many got 200."""
    ok = 0
    it = iter(bodies)

    async def worker() -> None:
        nonlocal ok
        for body in it:
            t = await client.request(body)
            ok += t is not None and t.status == 200

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok


# ---------------------------------------------------------------------------------------------------------------
# tokenize: the event loop's CPU per prompt while the router hashes it, inline vs in a worker thread
# ---------------------------------------------------------------------------------------------------------------
def bench_tokenize(args: argparse.Namespace) -> dict[str, Any]:
    """Hash N distinct chat requests (a shared system prompt and a new `--uniform-words`-word user turn each, the
    embedded SmolLM2 tokenizer and chat template) through the router's PromptHasher, one after another; the loop
    thread's CPU (time.thread_time, which a worker thread's CPU does not count) and wall time per prompt, with
    tokenization inline on the loop (the router before this change) and above the offload threshold in a thread."""
    from kubellm.builtin_models import builtin_model_path
    from kubellm.engine.loader.gguf_file import load_gguf
    from kubellm.router.tokenization import OFFLOAD_ABOVE_CHARS, PromptHasher

    info = load_gguf(Path(builtin_model_path()), None, "m", load_weights=False).tokenizer_info  # type: ignore[arg-type]
    rng = random.Random(args.seed)
    system = words(rng, 100)
    n = 200
    bodies = [{"model": "m", "messages": [{"role": "system", "content": system},
                                          {"role": "user", "content": words(rng, args.uniform_words)}]}
              for _ in range(n)]  # fmt: skip
    rows: dict[str, Any] = {}

    async def run(offload: int | None) -> dict[str, Any]:
        async def fetch(_: str) -> Any:
            return info

        hasher = PromptHasher(fetch, offload_above_chars=offload)
        await hasher.key("m", "chat", bodies[0])  # load the tokenizer (not measured)
        cpu, wall, keys = [], [], []
        for body in bodies[1:]:
            c0, w0 = time.thread_time(), time.perf_counter()
            key = await hasher.key("m", "chat", body)
            cpu.append(time.thread_time() - c0)
            wall.append(time.perf_counter() - w0)
            keys.append(key.hashes)
        hasher.close()
        return {"loop_cpu_ms_p50": pct(cpu, 50) * 1e3, "loop_cpu_ms_mean": sum(cpu) / len(cpu) * 1e3,
                "wall_ms_p50": pct(wall, 50) * 1e3, "blocks_mean": sum(map(len, keys)) / len(keys),
                "keys": keys}  # fmt: skip

    for name, offload in (
        ("inline (before)", None),
        (f"offloaded above {OFFLOAD_ABOVE_CHARS} chars", OFFLOAD_ABOVE_CHARS),
    ):
        rows[name] = asyncio.run(run(offload))
        print(name, {k: round(v, 3) for k, v in rows[name].items() if k != "keys"}, flush=True)
    first, *others = rows.values()
    same = all(r["keys"] == first["keys"] for r in others)
    for r in rows.values():
        del r["keys"]
    return {"workload": f"{n - 1} chat requests hashed one after another, each a shared {100}-word system prompt and "
            f"a new {args.uniform_words}-word user turn, SmolLM2's tokenizer and chat template, 16-token blocks",
            "rows": rows, "same_hashes": same}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
def write_results(results: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    path = RESULTS / f"router-{date}{results.get('suffix', '')}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    md = [f"# Router benchmark, {date}", "", f"Hardware: {results['hardware']}", ""]
    if results.get("command"):
        md += [f"Command: `{results['command']}` at commit {results.get('commit', '?')}", ""]
    if results.get("note"):
        md += [results["note"], ""]
    if "overhead" in results:
        o = results["overhead"]
        md += [
            "## Overhead",
            "",
            o["workload"],
            "",
            "Each figure is the median of the repeats; [min-max] of the repeats beside it. Added = minus direct's.",
            "",
            "| contender | p50 ms | p99 ms | added p50 ms | added p99 ms | stream TTFC p50 ms | added TTFC p50 ms | "
            "max req/s | router CPU ms/req |",
            "|---|---|---|---|---|---|---|---|---|",
        ]

        def cell(r: dict[str, Any], k: str, fmt: str = ".3f") -> str:
            if k not in r:
                return "-"
            runs = r.get(k + "_runs")
            spread = f" [{runs[0]:{fmt}}-{runs[-1]:{fmt}}]" if runs and len(runs) > 1 else ""
            return f"{r[k]:{fmt}}{spread}"

        for name, r in o["rows"].items():
            md.append(f"| {name} | {cell(r, 'p50_ms')} | {cell(r, 'p99_ms')} | {cell(r, 'added_p50_ms')} | "
                      f"{cell(r, 'added_p99_ms')} | {cell(r, 'ttfc_p50_ms')} | {cell(r, 'added_ttfc_p50_ms')} | "
                      f"{cell(r, 'max_rps', '.0f')} | {cell(r, 'cpu_ms_per_req')} |")  # fmt: skip
        md.append("")
        if any("core_us_per_req" in r for r in o["rows"].values()):
            md += ["What bounds the closed loop (max req/s phase): the router core's busy time per request (user, "
                   "system and softirq, the last left out of the process's CPU above), its softirq share, the "
                   "harness core's idle share, TCP segments sent per request (all legs):", "",
                   "| contender | router core µs/req | router core softirq | harness core idle | TCP segments/req |",
                   "|---|---|---|---|---|",
                   *(f"| {name} | {cell(r, 'core_us_per_req', '.1f')} | {cell(r, 'core_softirq_share', '.2f')} | "
                     f"{cell(r, 'harness_idle', '.2f')} | {cell(r, 'tcp_segs_per_req', '.2f')} |"
                     for name, r in o["rows"].items() if "core_us_per_req" in r), ""]  # fmt: skip
    for kind in ("multiturn", "uniform"):
        if kind not in results.get("routing", {}):
            continue
        w = results["routing"][kind]
        md += [
            f"## Routing: {kind}",
            "",
            w["workload"],
            "",
            "| policy | KV hit rate | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | engine TTFT mean ms | req/s | "
            "output tok/s | errors | load spills | decisions |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in w["rows"].items():
            spills = f"{r['decisions'].get('load_spill', 0):.0f}" if r.get("decisions") else "-"
            why = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["decisions"].items())) if r.get("decisions") else "-"
            md.append(f"| {name} | {r['hit_rate']:.3f} | {r['ttft_p50_ms']:.1f} | {r['ttft_p90_ms']:.1f} | "
                      f"{r.get('ttft_p99_ms', float('nan')):.1f} | {r.get('engine_ttft_mean_ms', float('nan')):.1f} | "
                      f"{r.get('req_s', float('nan')):.2f} | {r['output_tok_s']:.0f} | {r['errors']} | {spills} | "
                      f"{why} |")  # fmt: skip
        md.append("")
    if "cpu" in results:
        c = results["cpu"]
        md += ["## Router CPU per request, paired rounds", "", c["workload"], "",
               "| contender | CPU ms/req, median of rounds | min | max req/s, median | router core busy µs/req "
               "| router core: user / system / softirq / idle / steal |", "|---|---|---|---|---|---|",
               *(f"| {n} | {r['cpu_ms_per_req']:.3f} | {r['cpu_ms_per_req_min']:.3f} | {r['max_rps']:.0f} | "
                 f"{r.get('core_us_per_req', float('nan')):.1f} | "
                 + (" / ".join(f"{r['core_split'][k]:.2f}" for k in ("user", "system", "softirq", "idle", "steal"))
                    if r.get("core_split") else "-") + " |"
                 for n, r in c["rows"].items()),
               "", "Paired ratios (one per round, contenders measured next to each other), median [min-max]:", "",
               *(f"- {k}: {v['median']:.3f} [{v['min']:.3f}-{v['max']:.3f}]" for k, v in c["paired"].items()),
               ""]  # fmt: skip
    if "memory" in results:
        m = results["memory"]
        md += ["## Memory", "", m["workload"], "", "| prompts | RSS MiB |", "|---|---|",
               *(f"| {c} | {r:.1f} |" for c, r in m["rss_mib"]), "",
               f"Spread of RSS over the last 20% of the stream: {100 * m['last_20pct_spread']:.1f}% of its mean.",
               ""]  # fmt: skip
    if "restart" in results:
        r = results["restart"]
        md += ["## Restart", "", r["workload"], "",
               "| run | /health answers, s | first routed request, s | its route | to the cache holder | "
               "failed after ready |", "|---|---|---|---|---|---|"]  # fmt: skip
        for i, x in enumerate(r["runs"]):
            md.append(
                f"| {i} | {x['ready_s']:.2f} | {x['first_routed_s']:.2f} | {x['first_route']} | "
                f"{x['first_to_cache_holder']} | {x['failed_after_ready']} of {x['sent_after_ready']} |"
            )
        md.append("")
    if "tokenize" in results:
        t = results["tokenize"]
        md += ["## Tokenization on the event loop", "", t["workload"], "",
               "| mode | loop CPU ms/prompt p50 | mean | wall ms/prompt p50 | blocks |", "|---|---|---|---|---|",
               *(f"| {k} | {r['loop_cpu_ms_p50']:.3f} | {r['loop_cpu_ms_mean']:.3f} | {r['wall_ms_p50']:.3f} | "
                 f"{r['blocks_mean']:.0f} |" for k, r in t["rows"].items()),
               "", f"Same block hashes in every mode: {t['same_hashes']}", ""]  # fmt: skip
    if "ratios" in results:
        md += ["## Ratios", "", *(f"- {k}: {v:.3f}" for k, v in results["ratios"].items()), ""]
    path.with_suffix(".md").write_text("\n".join(md))
    return path


def ratios(results: dict[str, Any]) -> dict[str, float]:
    r: dict[str, float] = {}
    mt = results.get("routing", {}).get("multiturn", {}).get("rows", {})
    if "prefix precise" in mt and "oracle (longest cached prefix)" in mt:
        r["precise hit rate / oracle hit rate (target >= 0.9)"] = (
            mt["prefix precise"]["hit_rate"] / mt["oracle (longest cached prefix)"]["hit_rate"])  # fmt: skip
    if "prefix precise" in mt and "round_robin" in mt:
        r["precise TTFT p90 / round_robin TTFT p90 (target <= 0.2)"] = (
            mt["prefix precise"]["ttft_p90_ms"] / mt["round_robin"]["ttft_p90_ms"])  # fmt: skip
    if "prefix precise" in mt and "sglang-router cache_aware" in mt:
        sg = mt["sglang-router cache_aware"]
        r["precise hit rate / sglang cache_aware hit rate (target > 1)"] = (
            mt["prefix precise"]["hit_rate"] / sg["hit_rate"]
        )
        r["precise TTFT p90 / sglang cache_aware TTFT p90 (target < 1)"] = (
            mt["prefix precise"]["ttft_p90_ms"] / sg["ttft_p90_ms"])  # fmt: skip
    aa = mt.get("prefix precise, 2 router replicas (round robin)")
    if aa and "prefix precise" in mt:
        one = mt["prefix precise"]
        r["2 router replicas hit rate / one router's (target within 0.99-1.01)"] = aa["hit_rate"] / one["hit_rate"]
        r["2 router replicas TTFT p90 / one router's (target <= 1.1)"] = aa["ttft_p90_ms"] / one["ttft_p90_ms"]
        r["share of requests both replicas route to the same engine"] = aa["agreement"]
    tk = list(results.get("tokenize", {}).get("rows", {}).values())
    if len(tk) == 2:
        r["loop CPU per 700-word prompt, offloaded / inline"] = tk[1]["loop_cpu_ms_mean"] / tk[0]["loop_cpu_ms_mean"]
    ov = results.get("overhead", {}).get("rows", {})
    us, sg = ov.get("kubellm prefix"), ov.get("sglang-router cache_aware")
    if us:
        r["kubellm added latency p50 ms at 500 req/s (target <= 0.3)"] = us["added_p50_ms"]
        r["kubellm max req/s on one core (target >= 3000)"] = us["max_rps"]
        r["kubellm added stream TTFC p50 ms (target <= 1)"] = us["added_ttfc_p50_ms"]
    floor = ov.get("byte relay (floor: uvloop, no HTTP, no routing)")
    if us and floor:
        r["added p50 of the byte relay (the floor of a Python proxy here) ms"] = floor["added_p50_ms"]
        r["added p50 kubellm - byte relay ms"] = us["added_p50_ms"] - floor["added_p50_ms"]
    if us and sg:
        r["added p50 kubellm - sglang-router ms (target <= 0)"] = us["added_p50_ms"] - sg["added_p50_ms"]
        r["max req/s kubellm / sglang-router (target >= 1)"] = us["max_rps"] / sg["max_rps"]
        if "cpu_ms_per_req" in us and "cpu_ms_per_req" in sg:
            r["router CPU per request kubellm / sglang-router"] = us["cpu_ms_per_req"] / sg["cpu_ms_per_req"]
    for name, row in ov.items():
        if us and name.startswith("kubellm prefix (before"):
            r[f"router CPU per request, after / {name[16:-1]}"] = us["cpu_ms_per_req"] / row["cpu_ms_per_req"]
            r[f"max req/s, after / {name[16:-1]}"] = us["max_rps"] / row["max_rps"]
            r[f"added p50 ms, after - {name[16:-1]}"] = us["added_p50_ms"] - row["added_p50_ms"]
    w2 = ov.get("kubellm prefix --workers 2 (unpinned)")
    if us and w2:
        r["max req/s --workers 2 unpinned / 1 worker pinned"] = w2["max_rps"] / us["max_rps"]
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "what",
        choices=["overhead", "cpu", "routing", "restart", "memory", "tokenize", "all", "_instant", "_strip", "_relay"],
    )
    p.add_argument("--prompts", type=int, default=500_000, help="memory: unique prompts to send")
    p.add_argument("--upstream", default="")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--rate", type=float, default=None, help="req/s (overhead: 500; routing: 20)")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--no-sglang", action="store_true")
    p.add_argument("--active-active", action="store_true", help="routing: add 2 router replicas taking turns")
    p.add_argument("--stream-rate", type=float, default=100.0, help="overhead: streamed req/s")
    p.add_argument("--max-duration", type=float, default=5.0, help="overhead: seconds of the closed-loop run")
    p.add_argument("--repeats", type=int, default=3, help="overhead: runs per contender (median and spread)")
    p.add_argument(
        "--baseline-python",
        action="append",
        metavar="[LABEL=]PYTHON",
        help="overhead: also run the router of this interpreter's kubellm as 'kubellm prefix (before: LABEL)' "
        "(a venv with an older checkout installed; repeatable)",
    )
    p.add_argument("--engines", type=int, default=1, help="overhead, cpu: instant fake engines behind each router")
    p.add_argument("--rounds", type=int, default=12, help="cpu: closed-loop rounds per contender")
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tenants", type=int, default=50)
    p.add_argument("--users", type=int, default=5)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--system-words", type=int, default=1400, help="~2k tokens with the embedded tokenizer")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--uniform-requests", type=int, default=500)
    p.add_argument("--uniform-words", type=int, default=700)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", action="append", help="run only contenders whose name contains this (repeatable)")
    p.add_argument(
        "--router-arg",
        action="append",
        help="extra variant of our prefix router with these flags (routing, overhead, cpu)",
    )
    p.add_argument("--skip-uniform", action="store_true")
    p.add_argument("--skip-multiturn", action="store_true", help="run only the uniform workload (needs --rate)")
    p.add_argument("--out-suffix", default="", help="results file suffix, e.g. -kvpressure")
    p.add_argument("--fresh-engines", action="store_true", help="restart the replicas for every contender")
    p.add_argument("--engine-arg", action="append", help="extra flag for every `kubellm serve` (repeatable)")
    p.add_argument(
        "--load",
        type=float,
        default=None,
        help="measure the fleet's round_robin capacity first, then offer this fraction of it (e.g. 0.8)",
    )
    p.add_argument("--capacity-rate", type=float, default=60.0, help="req/s offered to measure capacity")
    p.add_argument("--note", default="", help="a paragraph for the results' markdown (how the run was made)")
    args = p.parse_args(argv)
    if args.what == "_instant":
        from router_load import run_instant_engine

        run_instant_engine(args.port)
        return 0
    if args.what == "_relay":
        from router_load import run_relay

        run_relay(args.port, args.upstream)
        return 0
    if args.what == "_strip":
        run_strip_shim(args.port, args.upstream)
        return 0
    results: dict[str, Any] = {"date": datetime.now(UTC).isoformat(), "hardware": hardware(), "suffix": args.out_suffix,
                               "command": " ".join(["python", "bench/router.py", *(argv or sys.argv[1:])]),
                               "commit": git_commit()}  # fmt: skip
    if args.note:
        results["note"] = args.note
    if args.engine_arg:
        results["engine_args"] = args.engine_arg
    if args.what in ("overhead", "all"):
        results["overhead"] = bench_overhead(args)
    if args.what == "cpu":
        results["cpu"] = bench_cpu(args)
    if args.what in ("routing", "all"):
        if args.rate is None or args.what == "all":
            args.rate = 20.0
        results["routing"] = bench_routing(args)
    if args.what == "restart":
        results["restart"] = bench_restart(args)
    if args.what == "memory":
        results["memory"] = bench_memory(args)
    if args.what == "tokenize":
        results["tokenize"] = bench_tokenize(args)
    results["ratios"] = ratios(results)
    for k, v in results["ratios"].items():
        print(f"{k}: {v:.3f}")
    print("wrote", write_results(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
