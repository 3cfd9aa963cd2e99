"""Router benchmark: routing quality on simulated replicas, and the router's own overhead.

    python bench/router.py overhead            # added latency at a fixed rate + max requests/s (instant backend)
    python bench/router.py routing             # multi-turn chat + uniform prompts on 4 `kubellm serve --device sim`
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

    def stop(self) -> None:
        for c in self.children:
            c.stop()
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def spawn(name: str, cmd: list[str], url: str, health: str = "/health", timeout: float = 300.0) -> Proc:
    log = open(f"/tmp/bench-router-{name}.log", "w")  # noqa: SIM115 (lives as long as the process)
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
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


def our_router(backends: list[str], policy: str, extra: list[str] | None = None, model: str = "m") -> Proc:
    port = free_port()
    cmd = [PY, "-m", "kubellm.cli", "router", "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
           "--model", model, "--log-level", "warning"]  # fmt: skip
    for b in backends:
        cmd += ["--backend", b]
    return spawn(f"router-{policy}", cmd + (extra or []), f"http://127.0.0.1:{port}")


def sglang_router(backends: list[str], policy: str = "cache_aware", strip: bool = False) -> Proc | None:
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
    proc = spawn(f"sglang-{policy}", cmd, f"http://127.0.0.1:{port}", health="/health", timeout=60)
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


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


# ---------------------------------------------------------------------------------------------------------------
# overhead: an instant backend, called directly and through each router
# ---------------------------------------------------------------------------------------------------------------
INSTANT_BODY = json.dumps(
    {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
     "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
     "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
).encode()  # fmt: skip


def run_instant_backend(port: int) -> None:
    from aiohttp import web

    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=INSTANT_BODY, content_type="application/json")

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", ok)
    app.router.add_post("/generate", ok)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/health_generate", health)
    app.router.add_get("/get_server_info", lambda r: web.json_response({}))
    app.router.add_get("/get_model_info", lambda r: web.json_response({"model_path": "m"}))
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello " * 50}], "max_tokens": 1}).encode()


async def fixed_rate(url: str, rate: float, duration: float) -> list[float]:
    """Open loop: one request every 1/rate s over kept-alive connections; returns latencies in seconds."""
    lat: list[float] = []
    conn = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=conn) as s:

        async def one() -> None:
            t0 = time.perf_counter()
            async with s.post(url + "/v1/chat/completions", data=CHAT,
                              headers={"Content-Type": "application/json"}) as r:  # fmt: skip
                await r.read()
                if r.status == 200:
                    lat.append(time.perf_counter() - t0)

        for _ in range(20):  # warm the connection pool
            await one()
        lat.clear()
        tasks = []
        start = time.perf_counter()
        n = int(rate * duration)
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks, return_exceptions=True)
    return lat


async def max_rps(url: str, concurrency: int, duration: float) -> float:
    done = 0
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as s:
        stop = time.perf_counter() + duration

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                async with s.post(url + "/v1/chat/completions", data=CHAT,
                                  headers={"Content-Type": "application/json"}) as r:  # fmt: skip
                    await r.read()
                    done += r.status == 200

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - t0)


def bench_overhead(rate: float, duration: float, with_sglang: bool) -> dict[str, Any]:
    port = free_port()
    backend = spawn("instant", [PY, __file__, "_instant", "--port", str(port)], f"http://127.0.0.1:{port}")
    results: dict[str, Any] = {"workload": f"POST /v1/chat/completions (~60 tokens), instant backend; {rate:g} req/s "
                               f"open loop for {duration:g}s over kept-alive connections; max req/s closed loop "
                               "with 64 connections for 5s", "rows": {}}  # fmt: skip
    contenders: list[tuple[str, Any]] = [("direct", None)]
    contenders += [("kubellm prefix", lambda: our_router([backend.url], "prefix", ["--kv-events", "off"]))]
    contenders += [("kubellm round_robin", lambda: our_router([backend.url], "round_robin", ["--kv-events", "off"]))]
    if with_sglang:
        contenders += [("sglang-router cache_aware", lambda: sglang_router([backend.url]))]
    try:
        for name, start in contenders:
            proc = start() if start else None
            if start and proc is None:
                continue
            url = proc.url if proc else backend.url
            try:
                lat = asyncio.run(fixed_rate(url, rate, duration))
                rps = asyncio.run(max_rps(url, 64, 5.0))
            finally:
                if proc:
                    proc.stop()
            results["rows"][name] = {"p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3, "n": len(lat),
                                     "max_rps": rps}  # fmt: skip
            print(f"{name:28s} p50 {pct(lat, 50) * 1e3:7.3f} ms  p99 {pct(lat, 99) * 1e3:7.3f} ms  "
                  f"max {rps:8.0f} req/s", flush=True)  # fmt: skip
    finally:
        backend.stop()
    direct = results["rows"]["direct"]
    for row in results["rows"].values():
        row["added_p50_ms"] = row["p50_ms"] - direct["p50_ms"]
        row["added_p99_ms"] = row["p99_ms"] - direct["p99_ms"]
    return results


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


async def run_workload(url: str, engines: list[str], model: str, kind: str, rate: float, seed: int,
                       tenants: int, users: int, turns: int, system_words: int, max_tokens: int,
                       uniform_requests: int, uniform_words: int, nonce: str = "") -> dict[str, Any]:  # fmt: skip
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
            try:
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
    decisions = await router_decisions(url)
    return {
        **({"decisions": decisions} if decisions else {}),
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
                            router.url, [e.url for e in fleet], args.model, kind, args.rate, args.seed, args.tenants,
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
def write_results(results: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    path = RESULTS / f"router-{date}{results.get('suffix', '')}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    md = [f"# Router benchmark, {date}", "", f"Hardware: {results['hardware']}", ""]
    if results.get("note"):
        md += [results["note"], ""]
    if "overhead" in results:
        o = results["overhead"]
        md += [
            "## Overhead",
            "",
            o["workload"],
            "",
            "| contender | p50 ms | p99 ms | added p50 ms | added p99 ms | max req/s |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in o["rows"].items():
            md.append(f"| {name} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['added_p50_ms']:.3f} | "
                      f"{r['added_p99_ms']:.3f} | {r['max_rps']:.0f} |")  # fmt: skip
        md.append("")
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
    ov = results.get("overhead", {}).get("rows", {})
    if "kubellm prefix" in ov:
        r["added latency p50 ms at fixed rate (target <= 1)"] = ov["kubellm prefix"]["added_p50_ms"]
    if "kubellm prefix" in ov and "sglang-router cache_aware" in ov:
        r["max req/s kubellm / sglang-router"] = (
            ov["kubellm prefix"]["max_rps"] / ov["sglang-router cache_aware"]["max_rps"]
        )
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["overhead", "routing", "all", "_instant", "_strip"])
    p.add_argument("--upstream", default="")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--rate", type=float, default=None, help="req/s (overhead: 500; routing: 20)")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--no-sglang", action="store_true")
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
    p.add_argument("--router-arg", action="append", help="extra prefix-precise variant with these router flags")
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
        run_instant_backend(args.port)
        return 0
    if args.what == "_strip":
        run_strip_shim(args.port, args.upstream)
        return 0
    results: dict[str, Any] = {"date": datetime.now(UTC).isoformat(), "hardware": hardware(), "suffix": args.out_suffix}
    if args.note:
        results["note"] = args.note
    if args.engine_arg:
        results["engine_args"] = args.engine_arg
    if args.what in ("overhead", "all"):
        results["overhead"] = bench_overhead(args.rate or 500.0, args.duration, not args.no_sglang)
    if args.what in ("routing", "all"):
        if args.rate is None or args.what == "all":
            args.rate = 20.0
        results["routing"] = bench_routing(args)
    results["ratios"] = ratios(results)
    for k, v in results["ratios"].items():
        print(f"{k}: {v:.3f}")
    print("wrote", write_results(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
