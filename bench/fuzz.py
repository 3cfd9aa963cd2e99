"""Fuzz the engine server and the router from their own /openapi.json documents with schemathesis.

    python bench/fuzz.py --requests 2000                   # CI size (tests/hardening/test_hardening_fuzz.py)
    python bench/fuzz.py --requests 10000 --write-results  # the published run (bench/results/fuzz-<date>.*)

One `kubellm serve --device sim` (short --max-model-len, so generated max_tokens stay cheap) and a
`kubellm router` in front of it, both on 127.0.0.1. Schemathesis (hypothesis underneath) draws requests for
every operation of each document, schema-valid ("positive") and schema-violating ("negative"); the router's
document declares its bodies as plain objects, so its chat/completions bodies are drawn from the engine's
request schemas as well as from its own. Each server gets --requests requests (the two run side by side).

Checks on every response: no 5xx, no hang (--timeout), every 4xx in OpenAI's error shape
({"error": {"message": str, "type": str, ...}}), every 200 JSON parses; after the run no KV block is held.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.core.errors import OperationNotFound

if __package__:
    from bench.result_files import host_info, record
else:  # run as `python bench/fuzz.py`: bench/ itself is on sys.path
    from result_files import host_info, record

MODEL = "fuzz"
HOST = "127.0.0.1"
KV_USED_RE = re.compile(r"^kubellm:kv_cache_blocks_used\{[^}]*\}\s+([0-9.eE+-]+)", re.M)
# (path, method) -> share of a server's request budget; /v1/kv_events streams forever and is probed apart.
ENGINE_MIX = {
    ("/v1/chat/completions", "POST"): 0.34,
    ("/v1/completions", "POST"): 0.30,
    ("/tokenize", "POST"): 0.14,
    ("/detokenize", "POST"): 0.14,
    ("/v1/models", "GET"): 0.016,
    ("/version", "GET"): 0.016,
    ("/health", "GET"): 0.016,
    ("/metrics", "GET"): 0.016,
    ("/v1/tokenizer_info", "GET"): 0.016,
}
ROUTER_MIX = {
    ("/v1/chat/completions", "POST"): 0.46,
    ("/v1/completions", "POST"): 0.46,
    ("/v1/models", "GET"): 0.03,
    ("/health", "GET"): 0.025,
    ("/metrics", "GET"): 0.025,
}


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def is_openai_error(data: Any) -> bool:
    """OpenAI's error shape: {"error": {"message": str, "type": str, ...}}."""
    err = data.get("error") if isinstance(data, dict) else None
    return isinstance(err, dict) and isinstance(err.get("message"), str) and isinstance(err.get("type"), str)


@dataclass
class Tally:
    """What one server answered."""

    name: str
    sent: int = 0
    by_op: dict[str, Counter] = field(default_factory=dict)
    violations: Counter = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def merge(self, other: Tally) -> None:
        """Add a shard's tally (shards run side by side, so the time is the longest shard's)."""
        self.sent += other.sent
        for op, c in other.by_op.items():
            self.by_op.setdefault(op, Counter()).update(c)
        self.violations.update(other.violations)
        self.examples += other.examples[: max(0, 10 - len(self.examples))]
        self.seconds = max(self.seconds, other.seconds)

    def record(self, op: str, status: int | str, violation: str | None, case: Any) -> None:
        with self.lock:
            self.sent += 1
            self.by_op.setdefault(op, Counter())[str(status)] += 1
            if violation:
                self.violations[violation] += 1
                if len(self.examples) < 10:
                    body = (
                        case.body
                        if isinstance(case.body, (dict, list, str, int, float, type(None)))
                        else repr(case.body)
                    )
                    self.examples.append(
                        {
                            "op": op,
                            "status": status,
                            "violation": violation,
                            "body": json.dumps(body, default=repr)[:600],
                        }
                    )


def check(response: requests.Response) -> str | None:
    """None if the answer is acceptable, else what is wrong with it."""
    s = response.status_code
    if s >= 500:
        return f"http_{s}"
    if 400 <= s < 500:
        try:
            data = response.json()
        except ValueError:
            return "4xx_not_json"
        return None if is_openai_error(data) else "4xx_not_openai_shape"
    if s == 200 and response.headers.get("Content-Type", "").startswith("application/json"):
        try:
            response.json()
        except ValueError:
            return "200_not_json"
    return None


def _adjust(case: Any, rng: random.Random, positive: bool) -> None:
    """Most schema-valid bodies name the served model (else nearly all stop at 404 before the interesting code),
    and most generations are short: output length is not what is fuzzed, and each simulated token costs ~5 ms."""
    if not (isinstance(case.body, dict) and positive):
        return
    if rng.random() < 0.85:
        case.body["model"] = MODEL
    path = case.operation.path
    if path not in ("/v1/chat/completions", "/v1/completions") or rng.random() >= 0.9:
        return
    keys = [k for k in ("max_tokens", "max_completion_tokens") if k in case.body]
    if not keys:
        keys = ["max_completion_tokens" if path == "/v1/chat/completions" else "max_tokens"]
    for key in keys:
        if not isinstance(case.body.get(key), int) or case.body[key] > 8:
            case.body[key] = rng.randint(1, 8)


def fuzz_operation(
    tally: Tally, base: str, op: Any, label: str, n: int, mode: GenerationMode, timeout: float, seed: int
) -> None:
    """n generated requests against one operation (fewer if hypothesis exhausts the space)."""
    if n <= 0:
        return
    rng = random.Random(seed)
    positive = mode == GenerationMode.POSITIVE
    session = requests.Session()

    @settings(
        max_examples=n,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=False,
        print_blob=False,
        phases=[Phase.generate],
    )
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        _adjust(case, rng, positive)
        try:
            r = case.call(base_url=base, timeout=timeout, session=session)
        except requests.Timeout:
            tally.record(label, "timeout", "hung", case)
            return
        except requests.ConnectionError as e:
            tally.record(label, "conn_error", f"connection_error:{type(e).__name__}", case)
            return
        tally.record(label, r.status_code, check(r), case)

    run()


def fuzz_server(
    tally: Tally,
    base: str,
    doc: dict[str, Any],
    mix: dict[tuple[str, str], float],
    total: int,
    timeout: float,
    seed: int,
    body_schemas: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Spread `total` requests over the operations by `mix`; 60 % schema-valid, 40 % schema-violating."""
    t0 = time.monotonic()
    schemas = [("own", schemathesis.openapi.from_dict(doc))]
    if body_schemas:
        schemas.append(("engine-bodies", schemathesis.openapi.from_dict(body_schemas)))
    for (path, method), share in mix.items():
        budget = round(total * share)
        found = []
        for src, schema in schemas:
            try:
                found.append((src, schema[path][method]))
            except (KeyError, OperationNotFound):
                continue
        for src, op in found:
            part = budget if len(found) == 1 else round(budget * (0.25 if src == "own" else 0.75))
            if method == "GET":
                part_modes = [(GenerationMode.POSITIVE, part)]
            else:
                pos = round(part * 0.6)
                part_modes = [(GenerationMode.POSITIVE, pos), (GenerationMode.NEGATIVE, part - pos)]
            for mode, n in part_modes:
                label = f"{method} {path}" + (f" [{src}]" if len(found) > 1 else "")
                before = tally.sent
                # hypothesis stops early when a small space is exhausted (GETs without parameters): top up.
                for _ in range(1 + (n if method == "GET" else 3)):
                    fuzz_operation(tally, base, op, label, n - (tally.sent - before), mode, timeout, seed + tally.sent)
                    if tally.sent - before >= n:
                        break
    tally.seconds = time.monotonic() - t0


def _fuzz_child(
    name: str,
    base: str,
    doc: dict[str, Any],
    mix: dict[tuple[str, str], float],
    total: int,
    timeout: float,
    seed: int,
    bodies: dict[str, Any] | None,
) -> Tally:
    """fuzz_server in a worker process; the tally comes back pickled (without its lock)."""
    tally = Tally(name)
    fuzz_server(tally, base, doc, mix, total, timeout, seed, bodies)
    tally.lock = None  # type: ignore[assignment]
    return tally


def probe_kv_events(base: str) -> str | None:
    """/v1/kv_events streams forever: check its first line is a snapshot, then hang up."""
    with requests.get(base + "/v1/kv_events", stream=True, timeout=10) as r:
        line = next(r.iter_lines())
        return None if json.loads(line).get("type") == "snapshot" else "kv_events_no_snapshot"


def start(args: list[str], port: int, log: Path) -> subprocess.Popen:
    """`python -m kubellm.cli ARGS` on 127.0.0.1:port."""
    with open(log, "a") as f:
        cmd = [sys.executable, "-m", "kubellm.cli", *args, "--host", HOST, "--port", str(port)]
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Poll /health until 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not healthy in {timeout}s")


def kv_blocks_used(base: str) -> int | None:
    """`kubellm:kv_cache_blocks_used` from an engine's /metrics."""
    m = KV_USED_RE.search(requests.get(base + "/metrics", timeout=5).text)
    return int(float(m.group(1))) if m else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start engine + router, fuzz both side by side, check the KV pool, stop both."""
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="kubellm-fuzz-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    e_port, r_port = free_port(), free_port()
    engine_url, router_url = f"http://{HOST}:{e_port}", f"http://{HOST}:{r_port}"
    engine = start(
        [
            "serve",
            "--device",
            "sim",
            "--served-model-name",
            MODEL,
            "--max-model-len",
            str(args.max_model_len),
            "--max-num-seqs",
            "64",
        ],
        e_port,
        log_dir / "engine.log",
    )
    router = None
    try:
        wait_healthy(engine_url, engine)
        router = start(
            ["router", "--model", MODEL, "--backend", engine_url, "--queue-timeout", "5"],
            r_port,
            log_dir / "router.log",
        )
        wait_healthy(router_url, router)
        engine_doc = requests.get(engine_url + "/openapi.json", timeout=10).json()
        router_doc = requests.get(router_url + "/openapi.json", timeout=10).json()
        bodies = {
            **engine_doc,
            "paths": {p: engine_doc["paths"][p] for p in ("/v1/chat/completions", "/v1/completions")},
        }
        # Worker processes (hypothesis' generation is CPU-bound: threads would share one GIL); each server's
        # budget is split over --workers-per-server shards, which overlap one another's waits on the server.
        k = args.workers_per_server
        targets = {
            "engine": (engine_url, engine_doc, ENGINE_MIX, None),
            "router": (router_url, router_doc, ROUTER_MIX, bodies),
        }
        with ProcessPoolExecutor(2 * k, mp_context=multiprocessing.get_context("fork")) as pool:
            jobs = {
                (name, i): pool.submit(
                    _fuzz_child,
                    name,
                    url,
                    doc,
                    mix,
                    args.requests // k + (i < args.requests % k),
                    args.timeout,
                    args.seed + 1000 * i + (name == "router"),
                    extra,
                )
                for name, (url, doc, mix, extra) in targets.items()
                for i in range(k)
            }
            tallies = {name: Tally(name) for name in targets}
            for (name, _), job in jobs.items():
                tallies[name].merge(job.result())
        kv_probe = probe_kv_events(engine_url)
        kv_used = None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            kv_used = kv_blocks_used(engine_url)
            if kv_used == 0:
                break
            time.sleep(0.5)
        alive = {"engine": engine.poll() is None, "router": router.poll() is None}
        cpu = {}
        for name, proc in (("engine", engine), ("router", router)):
            try:
                t = psutil.Process(proc.pid).cpu_times()
                cpu[name] = round(t.user + t.system, 1)
            except psutil.Error:
                cpu[name] = None
    finally:
        for p in (router, engine):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
    logs = "".join((log_dir / f).read_text(errors="replace") for f in ("engine.log", "router.log"))
    tracebacks = logs.count("Traceback (most recent call last)")
    summary: dict[str, Any] = {"config": vars(args), "log_dir": str(log_dir), "servers": {}}
    for name, t in tallies.items():
        statuses: Counter = Counter()
        for c in t.by_op.values():
            statuses.update(c)
        summary["servers"][name] = {
            "requests": t.sent,
            "seconds": round(t.seconds, 1),
            "requests_per_s": round(t.sent / t.seconds, 1) if t.seconds else 0,
            "statuses": dict(sorted(statuses.items())),
            "by_operation": {k: dict(sorted(v.items())) for k, v in t.by_op.items()},
            "violations": dict(t.violations),
            "violation_examples": t.examples,
        }
    summary["kv_events_probe"] = kv_probe or "ok"
    summary["kv_blocks_held_after"] = kv_used
    summary["tracebacks_in_logs"] = tracebacks
    summary["processes_alive_at_end"] = alive
    summary["server_cpu_seconds"] = cpu
    summary["passed"] = (
        all(not s["violations"] and s["requests"] >= args.requests for s in summary["servers"].values())
        and kv_used == 0
        and kv_probe is None
        and tracebacks == 0
        and all(alive.values())
    )
    return summary


def to_markdown(s: dict[str, Any], host: dict[str, Any]) -> str:
    """A short human-readable report."""
    lines = [
        f"# Fuzz: engine server (`--device sim`) and router, {s['config']['requests']} schemathesis requests each",
        "",
        f"Host: {host['cpus']} CPUs, Python {host['python']}, schemathesis {host['schemathesis']}, {host['when']}. "
        f"Command: `{host['command']}`. Result: **{'PASS' if s['passed'] else 'FAIL'}**.",
        "",
        "| server | requests | req/s | statuses | 5xx | hangs | 4xx not in OpenAI shape | violations |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, v in s["servers"].items():
        fivexx = sum(n for k, n in v["statuses"].items() if k.startswith("5"))
        hangs = v["violations"].get("hung", 0)
        shape = v["violations"].get("4xx_not_openai_shape", 0) + v["violations"].get("4xx_not_json", 0)
        lines.append(
            f"| {name} | {v['requests']} | {v['requests_per_s']} | {v['statuses']} | {fivexx} | {hangs} | "
            f"{shape} | {v['violations'] or 'none'} |"
        )
    lines += [
        "",
        f"KV blocks held after the run: {s['kv_blocks_held_after']}; tracebacks in server logs: "
        f"{s['tracebacks_in_logs']}; /v1/kv_events probe: {s['kv_events_probe']}; "
        f"processes alive at the end: {s['processes_alive_at_end']}.",
        "",
        "Per operation:",
        "",
    ]
    for name, v in s["servers"].items():
        for op, st in v["by_operation"].items():
            lines.append(f"- {name} `{op}`: {st}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000, help="generated requests per server (default 2000)")
    p.add_argument("--timeout", type=float, default=30.0, help="a request past this has hung (default 30 s)")
    p.add_argument("--max-model-len", type=int, default=96, help="engine context (default 96: cheap generations)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers-per-server", type=int, default=1, help="client processes per server (default 1)")
    p.add_argument("--log-dir", default=None)
    p.add_argument("--json-out", default=None)
    p.add_argument("--write-results", action="store_true", help="write bench/results/fuzz-<date>.json/.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = run(args)
    now = datetime.now(UTC)
    host = host_info("bench/fuzz.py", argv, now, schemathesis=getattr(schemathesis, "__version__", "?"))
    print(record("fuzz", summary, host, to_markdown, args.json_out, args.write_results, now))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
