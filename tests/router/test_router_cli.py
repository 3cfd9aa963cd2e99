"""`kubellm router` command line: help, flags into RouterConfig, and a real process serving /health."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from kubellm.router.cli import build_parser, config_from_args, main
from kubellm.routing import RoutingPolicy


def test_help_lists_the_knobs(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in (
        "--host", "--port", "--model", "--backend", "--discovery", "--namespace", "--service", "--selector",
        "--policy", "--balance-factor", "--api-key", "--relist-period", "--health-interval", "--queue-timeout",
        "--max-body-bytes", "--kv-events", "--approx-index-size", "--prefix-min-match-ratio",
        "--prefix-min-match-tokens",
    ):  # fmt: skip
        assert flag in out, flag


def test_flags_fill_the_config(monkeypatch):
    monkeypatch.setenv("KUBELLM_API_KEY", "a,b")
    c = config_from_args(
        ["--model", "m1", "--model", "m2", "--backend", "http://x:1", "--backend", "m2=y:2", "--policy", "least_load",
         "--balance-factor", "1.5", "--kv-events", "off", "--approx-index-size", "1000", "--queue-timeout", "3"]
    )  # fmt: skip
    assert c.models == ["m1", "m2"] and c.backends == ["http://x:1", "m2=y:2"]
    assert c.policy is RoutingPolicy.LEAST_LOAD and c.balance_factor == 1.5
    assert c.kv_events is False and c.approx_index_size == 1000 and c.queue_timeout == 3
    assert c.api_keys == ["a", "b"] and c.discovery == "static" and c.port == 8080
    k = config_from_args(["--service", "engines", "--namespace", "llm", "--selector", "app=x,tier=gpu"])
    assert k.discovery == "kubernetes" and k.selector == {"app": "x", "tier": "gpu"}
    assert build_parser().parse_args([]).policy is RoutingPolicy.PREFIX


def test_prefix_match_threshold_flags():
    """A cached prefix earns affinity from 30% of the prompt and 64 tokens by default; both are settable."""
    d = config_from_args([])
    assert (d.prefix_min_match_ratio, d.prefix_min_match_tokens) == (0.3, 64)
    c = config_from_args(["--prefix-min-match-ratio", "0.5", "--prefix-min-match-tokens", "128"])
    assert (c.prefix_min_match_ratio, c.prefix_min_match_tokens) == (0.5, 128)
    z = config_from_args(["--prefix-min-match-ratio", "0", "--prefix-min-match-tokens", "0"])  # any match counts
    assert (z.prefix_min_match_ratio, z.prefix_min_match_tokens) == (0.0, 0)


def test_bad_flags_fail_cleanly(capsys):
    assert main(["--policy", "random"]) == 2
    assert main(["--kv-events", "maybe"]) == 2
    for bad in (["--prefix-min-match-ratio", "1.5"], ["--prefix-min-match-ratio", "-0.1"],
                ["--prefix-min-match-ratio", "nan"], ["--prefix-min-match-tokens", "-1"],
                ["--prefix-min-match-tokens", "1.5"]):  # fmt: skip
        assert main(bad) == 2, bad
    assert main([]) == 2  # nothing to route to
    assert "--backend" in capsys.readouterr().err


def test_static_backend_spec_parsing():
    from kubellm.router.discovery.static import StaticDiscovery, parse_backend

    assert parse_backend("10.0.0.1:8000").url == "http://10.0.0.1:8000"
    e = parse_backend("llama=http://h:1/")
    assert e.url == "http://h:1" and e.models == frozenset({"llama"})
    merged = StaticDiscovery(["a=http://h:1", "b=http://h:1"], registry=None).endpoints  # type: ignore[arg-type]
    assert merged[0].models == frozenset({"a", "b"})
    with pytest.raises(ValueError):
        parse_backend("ftp://h")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_kubellm_router_process_serves_health_and_stops_on_sigterm():
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "kubellm.cli", "router", "--host", "127.0.0.1", "--port", str(port), "--model", "m"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
                time.sleep(0.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
            assert b'"m"' in r.read()
        # the router process must not import torch or the engine
        code = (
            "import sys, kubellm.router.app, kubellm.router.cli; "
            "print([m for m in sys.modules if m == 'torch' or m.startswith('kubellm.engine')])"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
        assert out.stdout.strip() == "[]", out.stderr
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
