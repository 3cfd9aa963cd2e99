"""The router's Prometheus metrics (names from kubellm.metric_names), one registry per router instance.

With `--workers N` every worker keeps its own registry; whichever worker answers GET /metrics asks the others
for their samples (`snapshot`) and serves the merge (`render_merged`): counters and histograms add up, each
gauge merges by its own rule (in-flight and queued requests add up; a backend is healthy if any worker can use
it; a KV-event seq shows the least advanced worker, -1 if any has no live stream).

A worker that dies takes its registry with it; what it had counted stays in the merged view: the supervisor
folds the worker's last samples (written by the worker itself when it stops cleanly, else the supervisor's own
last scrape of it) into `retired.json` in the workers' folder, counters and histograms only (a dead worker has
nothing in flight), and the merge adds that file in.
"""

from __future__ import annotations

import json
import os
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from kubellm import metric_names as mn

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class _LazyCounter:
    """A counter child whose increments are plain arithmetic, added to the prometheus child when scraped."""

    __slots__ = ("child", "n")

    def __init__(self, child: Any):
        self.child, self.n = child, 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.n += amount

    def flush(self) -> None:
        if self.n:
            self.child.inc(self.n)
            self.n = 0.0


class _LazyHistogram:
    """A histogram child counted per bucket in plain lists (one bisect per observation, no locks), added to the
    prometheus child's buckets and sum when scraped."""

    __slots__ = ("bounds", "child", "counts", "sum")

    def __init__(self, child: Any):
        self.child = child
        self.bounds = list(child._upper_bounds)  # ends with +Inf
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.sum += amount
        self.counts[bisect_left(self.bounds, amount)] += 1  # the first bucket with amount <= its bound

    def flush(self) -> None:
        for i, c in enumerate(self.counts):
            if c:
                self.child._buckets[i].inc(c)
                self.counts[i] = 0
        if self.sum:
            self.child._sum.inc(self.sum)
            self.sum = 0.0


class _Flusher:
    """Registered first: every read of the registry first folds the lazy children's counts into prometheus."""

    def __init__(self, metrics: RouterMetrics):
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        self.metrics.flush()
        return iter(())


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._lazy: list[_LazyCounter | _LazyHistogram] = []
        r.register(_Flusher(self))  # type: ignore[arg-type]
        self.requests = Counter(mn.ROUTER_REQUESTS, "Requests routed", ["model", "backend", "code"], registry=r)
        self.duration = Histogram(
            mn.ROUTER_REQUEST_DURATION, "Request duration", ["model"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.ttfb = Histogram(
            mn.ROUTER_TTFT, "Time to the first byte sent to the client", ["model"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.in_flight = Gauge(mn.ROUTER_IN_FLIGHT, "Requests in flight per backend", ["backend"], registry=r)
        self.queued = Gauge(mn.ROUTER_QUEUED, "Requests waiting for a replica", ["model"], registry=r)
        self.decisions = Counter(mn.ROUTER_ROUTING_DECISIONS, "Routing decisions", ["policy", "reason"], registry=r)
        self.match_ratio = Histogram(
            mn.ROUTER_PREFIX_MATCH_RATIO, "Matched prefix blocks / prompt blocks", buckets=_RATIO_BUCKETS, registry=r
        )
        self.retries = Counter(mn.ROUTER_RETRIES, "Retries to another replica", ["model"], registry=r)
        self.backend_healthy = Gauge(
            mn.ROUTER_BACKEND_HEALTHY, "1 if the backend takes requests", ["backend"], registry=r
        )
        self.discovery_events = Counter(mn.ROUTER_DISCOVERY_EVENTS, "Discovery events", ["kind"], registry=r)
        self.kv_event_seq = Gauge(
            mn.ROUTER_KV_EVENT_SEQ, "Seq of the last KV event applied (-1: no live stream)", ["backend"], registry=r
        )

        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """The hot path's handle on metric.labels(*labels) (or a label-less metric itself): memoized (prometheus'
        lookup was a visible share of a request's cost) and lazy (`inc`/`observe` are plain arithmetic, folded
        into the metric whenever the registry is read). Only for counters and histograms: their children live as
        long as the registry."""
        key = (id(metric), labels)
        c = self._children.get(key)
        if c is None:
            target = metric.labels(*labels) if labels else metric
            c = _LazyHistogram(target) if isinstance(metric, Histogram) else _LazyCounter(target)
            self._children[key] = c
            self._lazy.append(c)
        return c

    def flush(self) -> None:
        for c in self._lazy:
            c.flush()

    def forget_backend(self, backend: str) -> None:
        for g in (self.in_flight, self.backend_healthy, self.kv_event_seq):
            try:
                g.remove(backend)
            except KeyError:
                pass

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def snapshot(self) -> list[dict[str, Any]]:
        """This registry's families as JSON-able data (what one worker sends another)."""
        return [
            {
                "name": fam.name,
                "doc": fam.documentation,
                "type": fam.type,
                "samples": [[s.name, s.labels, s.value] for s in fam.samples],
            }
            for fam in self.registry.collect()
        ]


GAUGE_MERGE: dict[str, Callable[[Iterable[float]], float]] = {
    mn.ROUTER_IN_FLIGHT: sum,
    mn.ROUTER_QUEUED: sum,
    mn.ROUTER_BACKEND_HEALTHY: max,
    mn.ROUTER_KV_EVENT_SEQ: min,
}


Snapshot = list[dict[str, Any]]
RETIRED_FILE = "retired.json"


def _merge_values(snapshots: Iterable[Snapshot]) -> dict[str, tuple[dict[str, Any], dict[tuple[Any, ...], float]]]:
    """Per family: its header and each sample merged across the snapshots (see the module docstring)."""
    families: dict[str, dict[str, Any]] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]] = {}
    for snap in snapshots:
        for fam in snap:
            if fam["name"] not in families:
                families[fam["name"]] = fam
                values[fam["name"]] = {}
            per_sample = values[fam["name"]]
            for name, labels, value in fam["samples"]:
                per_sample.setdefault((name, tuple(sorted(labels.items()))), []).append(float(value))
    out = {}
    for fname, fam in families.items():
        merged: dict[tuple[Any, ...], float] = {}
        for (name, labels), vals in values[fname].items():
            if fam["type"] == "gauge":
                merged[(name, labels)] = GAUGE_MERGE.get(fname, sum)(vals)
            elif name.endswith("_created"):
                merged[(name, labels)] = min(vals)
            else:
                merged[(name, labels)] = sum(vals)
        out[fname] = (fam, merged)
    return out


def merge_snapshots(snapshots: Iterable[Snapshot]) -> list[Metric]:
    """Families of several workers merged into one view (see the module docstring for the rules)."""
    out = []
    for fam, merged in _merge_values(snapshots).values():
        metric = Metric(fam["name"], fam["doc"], fam["type"])
        for (name, labels), value in merged.items():
            metric.add_sample(name, dict(labels), value)
        out.append(metric)
    return out


def retired_part(snapshot: Snapshot) -> Snapshot:
    """What of a dead worker's samples stays counted: counters and histograms (gauges described a live process)."""
    return [fam for fam in snapshot if fam["type"] != "gauge"]


def fold_retired(metrics_dir: str, snapshot: Snapshot) -> None:
    """Add a dead worker's counters to the folder's retired.json (written whole, then renamed: readers never see
    half a file)."""
    merged = _merge_values([read_retired(metrics_dir), retired_part(snapshot)])
    data = [
        {"name": fam["name"], "doc": fam["doc"], "type": fam["type"],
         "samples": [[name, dict(labels), value] for (name, labels), value in samples.items()]}
        for fam, samples in merged.values()
    ]  # fmt: skip
    path = os.path.join(metrics_dir, RETIRED_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def read_retired(metrics_dir: str) -> Snapshot:
    try:
        with open(os.path.join(metrics_dir, RETIRED_FILE)) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return []
    return data if isinstance(data, list) else []


def final_path(metrics_dir: str, pid: int) -> str:
    return os.path.join(metrics_dir, f"final-{pid}.json")


def write_final(metrics_dir: str, snapshot: Snapshot) -> None:
    """A stopping worker's last samples, for the supervisor to fold into retired.json once the worker is gone."""
    path = final_path(metrics_dir, os.getpid())
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(snapshot, f)
        os.replace(path + ".tmp", path)
    except OSError:
        pass  # the folder is gone: the whole router is stopping


class _Families:
    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def render_merged(snapshots: Iterable[list[dict[str, Any]]]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(merge_snapshots(snapshots)))  # type: ignore[arg-type]
    return generate_latest(registry)
