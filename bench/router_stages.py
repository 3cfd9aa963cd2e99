"""Where a routed request's CPU goes: the router's prefix-work stages, timed inside a live router under load.

    python bench/router_stages.py --engines 8 --seconds 6

The router runs as its own process pinned to core 0 (as in `bench/router.py cpu`), with hooks around the stages of
the prefix work (body parse, prompt bytes, text-block hashing, the key as a whole, the index match, the policy's
choice, recording the send); instant fake engines and a closed-loop load generator (64 connections, the overhead
mode's 1000 distinct ~2 kB chat bodies) run on core 1. Each hook reads the thread's CPU clock before and after, so a
figure is the stage's CPU per request on a live router (cold caches between stages, as in service) plus ~1 µs of the
hook's own clock reads; the table sets each against the router process's whole CPU per request over the same run
(hooks included). A microbenchmark of the same functions in a loop reads ~3x less: its caches stay hot.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

# (module, owner attribute or "", function, label): the stages of the prefix work, in request order
STAGES = [
    ("kubellm.router.app", "", "parse_routed_body", "parse body (orjson, routed fields)"),
    ("kubellm.router.tokenization", "PromptHasher", "text_key_now", "prompt key (all of it)"),
    ("kubellm.router.tokenization", "", "dumps_bytes", "  prompt bytes (messages as JSON, and the last one's)"),
    ("kubellm.router.tokenization", "TextBlockHasher", "hashes", "  text-block hashes (history from the cache)"),
    ("kubellm.router.backends", "BackendRegistry", "routable_slots", "routable replicas (kept between changes)"),
    ("kubellm.router.prefix_index", "PrefixIndex", "match_all", "index match, every replica"),
    ("kubellm.router.policies.prefix", "PrefixPolicy", "choose_index", "policy choice"),
    ("kubellm.router.prefix_index", "PrefixIndex", "on_send", "record the send (LRU)"),
]


def run_hooked_router(out: str, router_args: list[str]) -> None:
    """The child: a router with a CPU-clock hook around every stage; writes {label: [ns, calls]} to `out` at exit."""
    import importlib

    import uvloop

    from kubellm.router.cli import config_from_args, serve

    acc: dict[str, list[int]] = {}
    clock = time.thread_time_ns

    def hook(owner: Any, name: str, label: str) -> None:
        f = getattr(owner, name)
        slot = acc.setdefault(label, [0, 0])

        @functools.wraps(f)
        def timed(*a: Any, **k: Any) -> Any:
            t = clock()
            try:
                return f(*a, **k)
            finally:
                slot[0] += clock() - t
                slot[1] += 1

        setattr(owner, name, timed)

    for module, owner, name, label in STAGES:
        mod = importlib.import_module(module)
        hook(getattr(mod, owner) if owner else mod, name, label)
    uvloop.run(serve(config_from_args(router_args)))
    Path(out).write_text(json.dumps(acc))


def main() -> int:
    if sys.argv[1:2] == ["_router"]:  # the hooked router child: _router OUT [router flags...]
        run_hooked_router(sys.argv[2], sys.argv[3:])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", type=int, default=8)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--out-suffix", default="", help="write bench/results/router-stages-<date><suffix>.md/.json")
    args = p.parse_args()
    import psutil
    from router_load import closed_loop

    import router as rb  # bench/router.py: processes, bodies, load

    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("pins the router to one core and the harness to another: needs 2")
    os.sched_setaffinity(0, {rb.HARNESS_CORE})
    fakes = []
    for i in range(args.engines):
        port = rb.free_port()
        cmd = rb.pinned([rb.PY, rb.__file__, "_instant", "--port", str(port)], rb.HARNESS_CORE)
        fakes.append(rb.spawn(f"stages-instant{i}", cmd, f"http://127.0.0.1:{port}"))
    out = f"/tmp/router-stages-{os.getpid()}.json"
    port = rb.free_port()
    cmd = [rb.PY, str(Path(__file__).resolve()), "_router", out, "--host", "127.0.0.1", "--port", str(port),
           "--policy", "prefix", "--model", "m", "--log-level", "warning",
           "--kv-events", "off", "--workers", "1"]  # fmt: skip
    for f in fakes:
        cmd += ["--backend", f.url]
    router = rb.spawn("stages-router", rb.pinned(cmd, rb.ROUTER_CORE), f"http://127.0.0.1:{port}")
    bodies = rb.overhead_bodies(1000, False)
    try:
        rb.run_load("127.0.0.1", port, lambda cl: closed_loop(cl, bodies, 64, 1.0))  # warm: caches, index
        proc = psutil.Process(router.popen.pid)
        c0 = sum(proc.cpu_times()[:2])
        rps = rb.run_load("127.0.0.1", port, lambda cl: closed_loop(cl, bodies, 64, args.seconds))
        cpu_us = (sum(proc.cpu_times()[:2]) - c0) * 1e6 / max(1.0, rps * args.seconds)
    finally:
        router.stop()
        for f in fakes:
            f.stop()
    acc = json.loads(Path(out).read_text())
    Path(out).unlink()
    n = max(1, acc[STAGES[0][3]][1])  # requests hooked (warm-up included): one body parse each
    rows = {label: acc[label][0] / 1e3 / n for *_, label in STAGES if label in acc}
    calls = {label: acc[label][1] / n for *_, label in STAGES if label in acc}  # (a stage may skip some)
    lines = [
        f"{args.engines} instant engines, {args.seconds:g}s closed loop after 1s warm-up: {rps:.0f} req/s, router CPU "
        f"{cpu_us:.1f} µs/request (hooks included)",
        "",
        "| stage | µs/request (thread CPU) | share of the router's CPU/request | calls/request |",
        "|---|---|---|---|",
        *(f"| {label} | {us:.1f} | {us / cpu_us:.2f} | {calls[label]:.2f} |" for label, us in rows.items()),
    ]
    print("\n".join(lines))
    date = time.strftime("%Y-%m-%d", time.gmtime())
    base = rb.RESULTS / f"router-stages-{date}{args.out_suffix}"
    meta = {"hardware": rb.hardware(), "commit": rb.git_commit(), "command": " ".join(sys.argv),
            "engines": args.engines, "seconds": args.seconds, "rps": rps, "router_cpu_us_per_req": cpu_us,
            "stages_us_per_req": rows,
            "stage_calls_per_req": calls}  # fmt: skip
    base.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    md = [f"# Router stages, {date}", "", f"Hardware: {meta['hardware']}", "",
          f"Command: `{meta['command']}` at commit {meta['commit']}", "",
          (__doc__ or "").strip(), "", *lines]  # fmt: skip
    base.with_suffix(".md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
