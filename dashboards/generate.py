"""Writes the Grafana dashboards (engine, router, fleet) into charts/kubellm/dashboards/.

Why a generator: every metric name comes from kubellm.metric_names, panels share one layout and one
datasource variable, and the JSON stays reviewable as a diff. The JSON files in the chart are the
canonical copies (helm can only read files inside the chart; Grafana users import them from there);
tests/ship/test_ship_dashboards.py fails when they drift from this script.

    python dashboards/generate.py            # rewrite the JSON
    python dashboards/generate.py --check    # exit 1 if the JSON is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubellm import metric_names as mn

OUT_DIR = Path(__file__).resolve().parents[1] / "charts" / "kubellm" / "dashboards"
SCHEMA_VERSION = 39
DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "[$__rate_interval]"


@dataclass
class Q:
    """One PromQL query of a panel."""

    expr: str
    legend: str = ""


@dataclass
class Panel:
    title: str
    queries: list[Q]
    unit: str = "short"
    kind: str = "timeseries"  # timeseries | stat | gauge | state-timeline
    width: int = 8
    height: int = 8
    description: str = ""
    max: float | None = None
    stack: bool = False


@dataclass
class Row:
    title: str
    panels: list[Panel] = field(default_factory=list)


def _sel(*matchers: str) -> str:
    return "{" + ",".join(matchers) + "}" if matchers else ""


def quantiles(bucket_family: str, matchers: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> list[Q]:
    """p50/p90/p99 of a histogram family, aggregated over replicas."""
    group = f"le{', ' + by if by else ''}"
    legend_prefix = "{{" + by + "}} " if by else ""
    return [
        Q(
            f"histogram_quantile({q}, sum by ({group}) (rate({bucket_family}_bucket{matchers}{RATE})))",
            f"{legend_prefix}p{round(q * 100)}",
        )
        for q in qs
    ]


def _panel_json(p: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    targets = [
        {"datasource": DS, "expr": q.expr, "legendFormat": q.legend or "__auto", "refId": chr(ord("A") + i)}
        for i, q in enumerate(p.queries)
    ]
    defaults: dict[str, Any] = {"unit": p.unit, "color": {"mode": "palette-classic"}}
    if p.max is not None:
        defaults["min"] = 0
        defaults["max"] = p.max
    if p.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10,
            "showPoints": "never",
            "spanNulls": True,
            "stacking": {"mode": "normal" if p.stack else "none", "group": "A"},
        }
    options: dict[str, Any] = {
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    if p.kind in ("stat", "gauge"):
        defaults["color"] = {"mode": "thresholds"}
        defaults["thresholds"] = {"mode": "absolute", "steps": [{"color": "green", "value": None}]}
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "textMode": "auto"}
    if p.kind == "state-timeline":
        defaults["color"] = {"mode": "thresholds"}
        defaults["thresholds"] = {
            "mode": "absolute",
            "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1}],
        }
        defaults["mappings"] = [
            {"type": "value", "options": {"0": {"text": "unhealthy"}, "1": {"text": "healthy"}}},
        ]
        options = {"showValue": "never", "legend": {"showLegend": True, "displayMode": "list", "placement": "bottom"}}
    return {
        "id": pid,
        "type": p.kind,
        "title": p.title,
        "description": p.description,
        "datasource": DS,
        "gridPos": {"h": p.height, "w": p.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": targets,
    }


def _layout(rows: list[Row]) -> list[dict[str, Any]]:
    """Rows stacked top to bottom; panels fill each row left to right on Grafana's 24-column grid."""
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for row in rows:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
            }
        )
        pid, y = pid + 1, y + 1
        x, row_height = 0, 0
        for p in row.panels:
            if x + p.width > 24:
                x, y, row_height = 0, y + row_height, 0
            panels.append(_panel_json(p, pid, x, y))
            pid, x, row_height = pid + 1, x + p.width, max(row_height, p.height)
        y += row_height
    return panels


def _var(name: str, label: str, query: str, include_all: bool = True) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": f"{name}-var"},
        "definition": query,
        "refresh": 2,
        "includeAll": include_all,
        "allValue": ".*",
        "multi": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def dashboard(uid: str, title: str, description: str, rows: list[Row], variables: list[dict[str, Any]]) -> dict:
    datasource_var = {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "refresh": 1,
        "regex": "",
    }
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["kubellm", "llm"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {"list": [datasource_var, *variables]},
        "links": [],
        "panels": _layout(rows),
    }


def engine_dashboard() -> dict:
    m = _sel('model_name=~"$model_name"')
    by_model = "sum by (model_name)"
    rows = [
        Row(
            "Load",
            [
                Panel("Running requests", [Q(f"{mn.NUM_REQUESTS_RUNNING}{m}", "{{model_name}} {{instance}}")]),
                Panel(
                    "Waiting requests",
                    [Q(f"{mn.NUM_REQUESTS_WAITING}{m}", "{{model_name}} {{instance}}")],
                    description="Queued in the scheduler; the operator scales up on sustained waiting.",
                ),
                Panel(
                    "KV cache usage",
                    [Q(f"{mn.KV_CACHE_USAGE_PERC}{m}", "{{model_name}} {{instance}}")],
                    unit="percentunit",
                    max=1,
                    description="Fraction of KV cache blocks held by requests (0-1).",
                ),
            ],
        ),
        Row(
            "Cache",
            [
                Panel(
                    "Prefix cache hit rate",
                    [
                        Q(
                            f"{by_model} (rate({mn.PREFIX_CACHE_HITS}_total{m}{RATE}))"
                            f" / {by_model} (rate({mn.PREFIX_CACHE_QUERIES}_total{m}{RATE}))",
                            "{{model_name}}",
                        )
                    ],
                    unit="percentunit",
                    max=1,
                    description="Prompt tokens served from cached KV blocks / prompt tokens looked up.",
                ),
                Panel(
                    "KV cache blocks",
                    [
                        Q(f"{by_model} ({mn.KV_CACHE_BLOCKS_USED}{m})", "{{model_name}} used"),
                        Q(f"{by_model} ({mn.KV_CACHE_BLOCKS_TOTAL}{m})", "{{model_name}} total"),
                    ],
                ),
                Panel(
                    "Preemptions /s",
                    [Q(f"{by_model} (rate({mn.NUM_PREEMPTIONS}_total{m}{RATE}))", "{{model_name}}")],
                    unit="ops",
                    description="Requests evicted from the running batch for lack of KV blocks.",
                ),
            ],
        ),
        Row(
            "Latency",
            [
                Panel("Time to first token", quantiles(mn.TIME_TO_FIRST_TOKEN, m), unit="s"),
                Panel("Inter-token latency", quantiles(mn.INTER_TOKEN_LATENCY, m), unit="s"),
                Panel("End-to-end request latency", quantiles(mn.E2E_REQUEST_LATENCY, m), unit="s"),
            ],
        ),
        Row(
            "Throughput",
            [
                Panel(
                    "Prompt tokens /s",
                    [Q(f"{by_model} (rate({mn.PROMPT_TOKENS}_total{m}{RATE}))", "{{model_name}}")],
                    unit="short",
                ),
                Panel(
                    "Generation tokens /s",
                    [Q(f"{by_model} (rate({mn.GENERATION_TOKENS}_total{m}{RATE}))", "{{model_name}}")],
                    unit="short",
                ),
                Panel(
                    "Finished requests /s by reason",
                    [
                        Q(
                            f"sum by (model_name, finished_reason) (rate({mn.REQUEST_SUCCESS}_total{m}{RATE}))",
                            "{{model_name}} {{finished_reason}}",
                        )
                    ],
                    unit="reqps",
                    stack=True,
                ),
                Panel("Queue time", quantiles(mn.REQUEST_QUEUE_TIME, m), unit="s", width=12),
                Panel(
                    "Cache configuration",
                    [Q(f"{mn.CACHE_CONFIG_INFO}{m}", "{{model_name}} block_size={{block_size}}")],
                    kind="stat",
                    width=12,
                    description="vllm:cache_config_info: one series per engine with its cache settings as labels.",
                ),
            ],
        ),
    ]
    variables = [_var("model_name", "Model", f"label_values({mn.NUM_REQUESTS_RUNNING}, model_name)")]
    return dashboard(
        "kubellm-engine",
        "kubellm / Engine",
        "kubellm engine replicas (vLLM-compatible metric names): load, KV cache, latency, throughput.",
        rows,
        variables,
    )


def router_dashboard() -> dict:
    m = _sel('model=~"$model"')
    rows = [
        Row(
            "Traffic",
            [
                Panel(
                    "Requests /s by code",
                    [Q(f"sum by (code) (rate({mn.ROUTER_REQUESTS}_total{m}{RATE}))", "{{code}}")],
                    unit="reqps",
                    stack=True,
                ),
                Panel("Request duration", quantiles(mn.ROUTER_REQUEST_DURATION, m), unit="s"),
                Panel("Time to first byte", quantiles(mn.ROUTER_TTFT, m), unit="s"),
            ],
        ),
        Row(
            "Backends",
            [
                Panel(
                    "In-flight requests per backend",
                    [Q(f"sum by (backend) ({mn.ROUTER_IN_FLIGHT})", "{{backend}}")],
                    description="Requests the router has open on each engine replica.",
                ),
                Panel(
                    "Requests /s per backend",
                    [Q(f"sum by (backend) (rate({mn.ROUTER_REQUESTS}_total{m}{RATE}))", "{{backend}}")],
                    unit="reqps",
                ),
                Panel(
                    "Backend health",
                    [Q(f"max by (backend) ({mn.ROUTER_BACKEND_HEALTHY})", "{{backend}}")],
                    kind="state-timeline",
                    description="1: the backend takes requests; 0: ejected (failed health, draining or terminating).",
                ),
            ],
        ),
        Row(
            "Routing",
            [
                Panel(
                    "Routing decisions /s by reason",
                    [
                        Q(
                            f"sum by (policy, reason) (rate({mn.ROUTER_ROUTING_DECISIONS}_total{RATE}))",
                            "{{policy}} {{reason}}",
                        )
                    ],
                    unit="ops",
                    stack=True,
                ),
                Panel(
                    "Prefix match ratio",
                    [
                        Q(
                            f"sum(rate({mn.ROUTER_PREFIX_MATCH_RATIO}_sum{RATE}))"
                            f" / sum(rate({mn.ROUTER_PREFIX_MATCH_RATIO}_count{RATE}))",
                            "mean",
                        ),
                        *quantiles(mn.ROUTER_PREFIX_MATCH_RATIO, "", qs=(0.5,)),
                    ],
                    unit="percentunit",
                    max=1,
                    description="Prompt blocks already cached on the chosen replica / prompt blocks.",
                ),
                Panel(
                    "Retries /s and queued requests",
                    [
                        Q(f"sum by (model) (rate({mn.ROUTER_RETRIES}_total{m}{RATE}))", "{{model}} retries/s"),
                        Q(f"sum by (model) ({mn.ROUTER_QUEUED}{m})", "{{model}} queued"),
                    ],
                    description="Retries to another replica; requests held while no replica is ready "
                    "(scale from zero).",
                ),
                Panel(
                    "Discovery events /s",
                    [Q(f"sum by (kind) (rate({mn.ROUTER_DISCOVERY_EVENTS}_total{RATE}))", "{{kind}}")],
                    unit="ops",
                    width=24,
                    height=6,
                ),
            ],
        ),
    ]
    variables = [_var("model", "Model", f"label_values({mn.ROUTER_REQUESTS}_total, model)")]
    return dashboard(
        "kubellm-router",
        "kubellm / Router",
        "kubellm routers: traffic by status code, latency, per-backend load and health, routing decisions.",
        rows,
        variables,
    )


def fleet_dashboard() -> dict:
    sel = _sel('namespace=~"$namespace"')
    rows = [
        Row(
            "Replicas",
            [
                Panel(
                    "Desired vs ready replicas per LLMDeployment",
                    [
                        Q(
                            f"sum by (namespace, name) ({mn.OPERATOR_DESIRED_REPLICAS}{sel})",
                            "{{namespace}}/{{name}} desired",
                        ),
                        Q(
                            f"sum by (namespace, name) ({mn.OPERATOR_READY_REPLICAS}{sel})",
                            "{{namespace}}/{{name}} ready",
                        ),
                    ],
                    width=16,
                ),
                Panel(
                    "Not ready replicas",
                    [
                        Q(
                            f"sum({mn.OPERATOR_DESIRED_REPLICAS}{sel}) - sum({mn.OPERATOR_READY_REPLICAS}{sel})",
                            "desired - ready",
                        )
                    ],
                    kind="stat",
                ),
            ],
        ),
        Row(
            "Scaling",
            [
                Panel(
                    "Scaling events by reason",
                    [
                        Q(
                            f"sum by (namespace, name, reason) "
                            f"(increase({mn.OPERATOR_SCALING_DECISIONS}_total{sel}[$__interval]))",
                            "{{namespace}}/{{name}} {{reason}}",
                        )
                    ],
                    kind="timeseries",
                    stack=True,
                    width=12,
                ),
                Panel(
                    "Scale signals: waiting requests and router-held requests",
                    [
                        Q(f"sum by (model_name) ({mn.NUM_REQUESTS_WAITING})", "{{model_name}} waiting (engines)"),
                        Q(f"sum by (model) ({mn.ROUTER_QUEUED})", "{{model}} held (routers)"),
                    ],
                    width=12,
                    description="What the autoscaler reads: queue depth on engines; requests the router holds "
                    "while a model is scaled to zero.",
                ),
                Panel(
                    "KV cache usage by model",
                    [Q(f"avg by (model_name) ({mn.KV_CACHE_USAGE_PERC})", "{{model_name}}")],
                    unit="percentunit",
                    max=1,
                    width=12,
                ),
            ],
        ),
        Row(
            "Operator",
            [
                Panel(
                    "Reconcile errors /s",
                    [
                        Q(
                            f"sum by (namespace, name) (rate({mn.OPERATOR_RECONCILE_ERRORS}_total{sel}{RATE}))",
                            "{{namespace}}/{{name}}",
                        )
                    ],
                    unit="ops",
                    width=12,
                ),
                Panel("Reconcile duration", quantiles(mn.OPERATOR_RECONCILE_DURATION, ""), unit="s", width=12),
            ],
        ),
    ]
    variables = [
        _var("namespace", "Namespace", f"label_values({mn.OPERATOR_DESIRED_REPLICAS}, namespace)"),
    ]
    return dashboard(
        "kubellm-fleet",
        "kubellm / Fleet",
        "Every LLMDeployment: desired vs ready replicas, scaling decisions and their signals, operator health.",
        rows,
        variables,
    )


DASHBOARDS = {"engine": engine_dashboard, "router": router_dashboard, "fleet": fleet_dashboard}


def render_all() -> dict[str, str]:
    """File name -> JSON text, as committed."""
    return {f"{name}.json": json.dumps(build(), indent=2) + "\n" for name, build in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON differs")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    stale = []
    for name, text in render_all().items():
        path = args.out_dir / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("stale dashboards (run python dashboards/generate.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
