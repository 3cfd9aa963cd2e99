"""Grafana dashboards: they parse, use a current schema, every panel has a query, and every metric a query
names is one kubellm.metric_names defines, with the suffix its type exposes (counters `_total`, histograms
`_bucket`/`_sum`/`_count`). The live check that a running engine, router and operator export them all is
in test_ship_metrics_live.py.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from kubellm import metric_names as mn

from .tools import CHART, REPO

DASHBOARD_DIR = CHART / "dashboards"
# Names in PromQL that are metrics: ours all start with vllm: / kubellm: / kubellm_.
METRIC_TOKEN = re.compile(r"(?<![A-Za-z0-9_:])((?:vllm|kubellm)[:_][A-Za-z0-9_:]*)")


def metric_kinds() -> dict[str, str]:
    """family name -> counter | histogram | gauge, read from the type comments in kubellm/metric_names.py."""
    kinds: dict[str, str] = {}
    for line in Path(mn.__file__).read_text().splitlines():
        m = re.match(r'^[A-Z0-9_]+ = "([^"]+)"\s*(?:#\s*(.*))?$', line)
        if not m:
            continue
        comment = (m.group(2) or "").lower()
        kind = (
            "counter" if comment.startswith("counter") else "histogram" if comment.startswith("histogram") else "gauge"
        )
        kinds[m.group(1)] = kind
    return kinds


def exposed_series(kinds: dict[str, str]) -> set[str]:
    """Every series name prometheus-client exposes for our families."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {name + s for name, kind in kinds.items() for s in suffixes[kind]}


def dashboards() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(DASHBOARD_DIR.glob("*.json"))}


def panels(d: dict) -> list[dict]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out += p.get("panels", [])  # collapsed rows nest their panels
    return [p for p in out if p["type"] != "row"]


def queries(d: dict) -> list[str]:
    exprs = [t["expr"] for p in panels(d) for t in p.get("targets", [])]
    for v in d.get("templating", {}).get("list", []):
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if v.get("type") == "query" and q:
            exprs.append(q)
    return exprs


def dashboard_metric_names() -> set[str]:
    return {m for d in dashboards().values() for q in queries(d) for m in METRIC_TOKEN.findall(q)}


def test_three_dashboards_parse_with_current_schema() -> None:
    ds = dashboards()
    assert set(ds) == {"engine", "router", "fleet"}
    uids = {d["uid"] for d in ds.values()}
    assert len(uids) == 3
    for name, d in ds.items():
        assert d["schemaVersion"] >= 39, name
        assert d["title"].startswith("kubellm"), name
        variables = {v["name"]: v for v in d["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"


def test_every_panel_has_a_query_and_uses_the_datasource_variable() -> None:
    for name, d in dashboards().items():
        ps = panels(d)
        assert len(ps) >= 6, name
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for p in ps:
            targets = p.get("targets") or []
            assert targets, f"{name}: panel {p['title']!r} has no query"
            for t in targets:
                assert t.get("expr", "").strip(), f"{name}: panel {p['title']!r} has an empty query"
                assert METRIC_TOKEN.search(t["expr"]), f"{name}: {p['title']!r} queries no kubellm metric"
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            g = p["gridPos"]
            assert g["x"] >= 0 and g["x"] + g["w"] <= 24, f"{name}: {p['title']!r} overflows the grid"


def test_panels_do_not_overlap() -> None:
    for name, d in dashboards().items():
        cells: set[tuple[int, int]] = set()
        for p in d["panels"]:
            g = p["gridPos"]
            mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not cells & mine, f"{name}: {p['title']!r} overlaps another panel"
            cells |= mine


def test_every_metric_is_defined_in_metric_names_with_its_type_suffix() -> None:
    allowed = exposed_series(metric_kinds())
    unknown = dashboard_metric_names() - allowed
    assert not unknown, f"dashboards query series kubellm does not export: {sorted(unknown)}"


def test_required_signals_are_charted() -> None:
    """What the [ship] issue asks each dashboard to show."""
    want = {
        "engine": [
            mn.NUM_REQUESTS_RUNNING,
            mn.NUM_REQUESTS_WAITING,
            mn.KV_CACHE_USAGE_PERC,
            mn.PREFIX_CACHE_HITS + "_total",
            mn.PREFIX_CACHE_QUERIES + "_total",
            mn.TIME_TO_FIRST_TOKEN + "_bucket",
            mn.INTER_TOKEN_LATENCY + "_bucket",
            mn.E2E_REQUEST_LATENCY + "_bucket",
            mn.PROMPT_TOKENS + "_total",
            mn.GENERATION_TOKENS + "_total",
            mn.NUM_PREEMPTIONS + "_total",
        ],
        "router": [
            mn.ROUTER_REQUESTS + "_total",
            mn.ROUTER_REQUEST_DURATION + "_bucket",
            mn.ROUTER_IN_FLIGHT,
            mn.ROUTER_ROUTING_DECISIONS + "_total",
            mn.ROUTER_RETRIES + "_total",
            mn.ROUTER_BACKEND_HEALTHY,
        ],
        "fleet": [
            mn.OPERATOR_DESIRED_REPLICAS,
            mn.OPERATOR_READY_REPLICAS,
            mn.OPERATOR_SCALING_DECISIONS + "_total",
        ],
    }
    ds = dashboards()
    for name, metrics in want.items():
        text = " ".join(queries(ds[name]))
        for m in metrics:
            assert m in text, f"{name} dashboard does not chart {m}"
        quantiles = re.findall(r"histogram_quantile\((0\.\d+)", text)
        if name != "fleet":
            assert {"0.5", "0.9", "0.99"} <= set(quantiles), name


def test_chart_json_is_what_the_generator_writes(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("dashboards_generate", REPO / "dashboards" / "generate.py")
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = gen  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(gen)
    finally:
        sys.modules.pop(spec.name, None)
    for name, text in gen.render_all().items():
        assert (DASHBOARD_DIR / name).read_text() == text, "stale: run python dashboards/generate.py"


@pytest.mark.parametrize("expr", ["sum(rate(vllm:prompt_tokens[5m]))", "vllm:time_to_first_token_seconds"])
def test_the_checker_catches_wrong_suffixes(expr: str) -> None:
    """A counter without `_total` or a bare histogram is not an exported series: the check must say so."""
    assert set(METRIC_TOKEN.findall(expr)) - exposed_series(metric_kinds())
