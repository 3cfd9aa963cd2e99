"""Every metric the dashboards chart is exported by a running stack: a real `kubellm serve --device sim`
engine, a real `kubellm router` in front of it (both as subprocesses, through the CLI users run), and the
operator's /metrics server. A family counts as exported when /metrics declares it (`# TYPE` line), so a
labelled counter nobody has incremented yet (retries) still counts; the suffixes follow its type.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubellm import metric_names as mn

from .test_ship_dashboards import dashboard_metric_names
from .tools import REPO

SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",), "info": ("_info",)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exported_series(text: str) -> set[str]:
    out: set[str] = set()
    for fam in text_string_to_metric_families(text):
        out |= {fam.name + s for s in SUFFIXES.get(fam.type, ("",))}
        out |= {s.name for s in fam.samples}
    return out


def get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{url} exited before becoming healthy: {log.read_text()[-600:]}")
        try:
            get(url, timeout=1.0)
            return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"{url} not healthy after {timeout}s: {log.read_text()[-600:]}")


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "kubellm.cli", *args], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=REPO
    )


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[dict[str, str]]:
    """An engine on the sim device and a router in front of it; yields their base URLs."""
    logs = tmp_path_factory.mktemp("stack")
    engine_port, router_port = free_port(), free_port()
    engine = start(["serve", "--device", "sim", "--host", "127.0.0.1", "--port", str(engine_port)], logs / "engine.log")
    router = None
    try:
        wait_healthy(f"http://127.0.0.1:{engine_port}/health", engine, logs / "engine.log")
        model = json.loads(get(f"http://127.0.0.1:{engine_port}/v1/models"))["data"][0]["id"]
        router = start(
            ["router", "--host", "127.0.0.1", "--port", str(router_port), "--model", model,
             "--backend", f"{model}=http://127.0.0.1:{engine_port}", "--discovery", "static"],
            logs / "router.log",
        )  # fmt: skip
        wait_healthy(f"http://127.0.0.1:{router_port}/health", router, logs / "router.log")
        yield {"engine": f"http://127.0.0.1:{engine_port}", "router": f"http://127.0.0.1:{router_port}", "model": model}
    finally:
        for p in (router, engine):
            if p is not None:
                stop(p)


def chat(base: str, model: str, text: str) -> dict:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8}).encode()
    req = urllib.request.Request(f"{base}/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def operator_metrics_text() -> str:
    """The operator's own /metrics server (operator/metrics.py), as `kubellm operator` starts it."""
    from kubellm.operator.metrics import OperatorMetrics, start_server

    async def scrape() -> str:
        m = OperatorMetrics()
        m.desired.labels("ns", "demo").set(2)
        m.ready.labels("ns", "demo").set(1)
        port = free_port()
        runner = await start_server(m, "127.0.0.1", port)
        try:
            return await asyncio.to_thread(get, f"http://127.0.0.1:{port}/metrics")
        finally:
            await runner.cleanup()

    return asyncio.run(scrape())


def test_every_dashboard_metric_is_exported(stack: dict[str, str]) -> None:
    for i in range(3):
        out = chat(stack["router"], stack["model"], f"Say hello number {i}.")
        assert out["choices"][0]["message"]["content"] is not None
    exported = (
        exported_series(get(stack["engine"] + "/metrics"))
        | exported_series(get(stack["router"] + "/metrics"))
        | exported_series(operator_metrics_text())
    )
    wanted = dashboard_metric_names()
    missing = wanted - exported
    assert not missing, f"dashboards chart series no running component exports: {sorted(missing)}"


def _sample(text: str, name: str) -> float:
    """One series' value (the families here carry the one model_name label)."""
    return next(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


def test_vllm_dashboard_distributions_on_a_live_engine(stack: dict[str, str]) -> None:
    """The per-request and per-step histograms vLLM's dashboards plot move with real requests."""
    import openai

    client = openai.OpenAI(base_url=stack["engine"] + "/v1", api_key="none", max_retries=0)
    before = get(stack["engine"] + "/metrics")
    outs = [
        client.completions.create(model=stack["model"], prompt="Count: one two three", max_tokens=5, n=1),
        client.completions.create(model=stack["model"], prompt="Name two colours", max_tokens=4, n=2, temperature=1),
    ]
    after = get(stack["engine"] + "/metrics")

    def delta(name: str) -> float:
        return _sample(after, name) - _sample(before, name)

    assert delta(mn.REQUEST_PROMPT_TOKENS + "_count") == 2
    assert delta(mn.REQUEST_PROMPT_TOKENS + "_sum") == sum(o.usage.prompt_tokens for o in outs)  # n=2: once
    assert delta(mn.REQUEST_GENERATION_TOKENS + "_sum") == sum(o.usage.completion_tokens for o in outs)
    assert delta(mn.REQUEST_PARAMS_N + "_sum") == 3
    for name in (mn.REQUEST_PREFILL_TIME, mn.REQUEST_DECODE_TIME, mn.REQUEST_INFERENCE_TIME):
        assert delta(name + "_count") == 2, name
    assert delta(mn.ITERATION_TOKENS + "_count") >= 5  # at least one step per generated token of the longest
    assert delta(mn.ITERATION_TOKENS + "_sum") >= sum(o.usage.completion_tokens for o in outs)
