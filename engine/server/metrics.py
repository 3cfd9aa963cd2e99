"""Prometheus metrics under vLLM's names (kubellm/metric_names.py), so existing dashboards, KEDA rules and
llm-d-style schedulers scrape a kubellm engine unchanged.

Gauges and cumulative counters are read from the latest `engine.stats()` snapshot at scrape time (the
engine owns those counts; copying them into prometheus Counters would double-book). Latency histograms are
fed from request outputs by the engine thread as they happen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kubellm import metric_names as mn

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Buckets in seconds: fine at the low end (a GPU's TTFT is milliseconds), long tails for CPU and queueing.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0, 120.0, 600.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
TOKEN_COUNT_BUCKETS = tuple(float(m * 10**e) for e in range(6) for m in (1, 2, 5)) + (1e6,)  # 1, 2, 5, ... 1M
STEP_TOKEN_BUCKETS = (1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0)
N_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0)


@dataclass
class _Progress:
    last_token_time: float | None = None
    saw_first_token: bool = False
    tokens: int = 0  # generated so far (outputs are deltas)


class _EngineStatsCollector(Collector):
    """Exports the engine's own counts from its latest stats snapshot."""

    def __init__(self, model_name: str, stats: Callable[[], Any], cache_info: dict[str, str]):
        self.model_name = model_name
        self.stats = stats
        self.cache_info = cache_info

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        labels = ["model_name"]
        values = [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, value)
            return c

        def stat(name: str) -> float:
            return float(getattr(s, name, 0) or 0) if s is not None else 0.0

        yield gauge(mn.NUM_REQUESTS_RUNNING, "Requests in the running batch.", stat("num_running"))
        yield gauge(mn.NUM_REQUESTS_WAITING, "Requests waiting to be scheduled.", stat("num_waiting"))
        yield gauge(mn.KV_CACHE_USAGE_PERC, "KV cache usage, a 0-1 fraction.", stat("kv_usage"))
        yield gauge(mn.KV_CACHE_BLOCKS_USED, "KV cache blocks held by requests.", stat("blocks_used"))
        yield gauge(mn.KV_CACHE_BLOCKS_TOTAL, "KV cache blocks in the pool.", stat("blocks_total"))
        yield counter(mn.PREFIX_CACHE_QUERIES, "Prefix cache queries, in tokens.", stat("prefix_queries"))
        yield counter(mn.PREFIX_CACHE_HITS, "Prefix cache hits, in tokens.", stat("prefix_hits"))
        yield counter(mn.NUM_PREEMPTIONS, "Cumulative preemptions.", stat("num_preemptions"))
        yield counter(mn.PROMPT_TOKENS, "Prompt tokens processed.", stat("prompt_tokens"))
        yield counter(mn.GENERATION_TOKENS, "Generation tokens produced.", stat("generation_tokens"))
        info = GaugeMetricFamily(
            mn.CACHE_CONFIG_INFO, "KV cache configuration.", labels=["model_name", *self.cache_info]
        )
        info.add_metric([self.model_name, *self.cache_info.values()], 1.0)
        yield info


COMPILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STRUCTURED_OUTPUT_KINDS = ("json", "json_object", "regex", "choice", "grammar")


class ServerMetrics:
    """One registry per server (not the global one), so several servers can live in one test process."""

    def __init__(self, model_name: str, stats: Callable[[], Any], cache_info: dict[str, str] | None = None):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(model_name, stats, cache_info if cache_info is not None else {}))
        lbl = ["model_name"]
        self.request_success = Counter(
            mn.REQUEST_SUCCESS, "Finished requests by finish reason.", [*lbl, "finished_reason"], registry=self.registry
        )
        self.ttft = Histogram(
            mn.TIME_TO_FIRST_TOKEN, "Time to first token.", lbl, buckets=TTFT_BUCKETS, registry=self.registry
        )
        self.itl = Histogram(
            mn.INTER_TOKEN_LATENCY, "Time between output tokens.", lbl, buckets=ITL_BUCKETS, registry=self.registry
        )
        self.e2e = Histogram(
            mn.E2E_REQUEST_LATENCY, "Arrival to finish.", lbl, buckets=REQUEST_BUCKETS, registry=self.registry
        )
        self.queue = Histogram(
            mn.REQUEST_QUEUE_TIME, "Arrival to first scheduled.", lbl, buckets=REQUEST_BUCKETS, registry=self.registry
        )

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            h = Histogram(name, doc, lbl, buckets=buckets, registry=self.registry)
            h.labels(model_name)  # exported (at zero) from the start, as vLLM's are
            return h

        self.prompt_tokens = hist(mn.REQUEST_PROMPT_TOKENS, "Prompt tokens per finished request.", TOKEN_COUNT_BUCKETS)
        self.generation_tokens = hist(
            mn.REQUEST_GENERATION_TOKENS, "Generated tokens per finished request.", TOKEN_COUNT_BUCKETS
        )
        self.prefill_time = hist(mn.REQUEST_PREFILL_TIME, "First scheduled to first token.", REQUEST_BUCKETS)
        self.decode_time = hist(mn.REQUEST_DECODE_TIME, "First token to last token.", REQUEST_BUCKETS)
        self.inference_time = hist(mn.REQUEST_INFERENCE_TIME, "First scheduled to last token.", REQUEST_BUCKETS)
        self.iteration_tokens = hist(mn.ITERATION_TOKENS, "Tokens scheduled per engine step.", STEP_TOKEN_BUCKETS)
        self.params_n = hist(mn.REQUEST_PARAMS_N, "The n sampling parameter per finished request.", N_BUCKETS)
        self.grammar_compile = Histogram(
            mn.STRUCTURED_OUTPUT_COMPILE_TIME,
            "Time to compile an output constraint (cache misses only).",
            lbl,
            buckets=COMPILE_BUCKETS,
            registry=self.registry,
        ).labels(model_name)
        self.constrained_requests = Counter(
            mn.STRUCTURED_OUTPUT_REQUESTS, "Requests with an output constraint.", [*lbl, "kind"], registry=self.registry
        )
        for kind in STRUCTURED_OUTPUT_KINDS:
            self.constrained_requests.labels(model_name, kind)
        for reason in ("stop", "length", "abort"):
            self.request_success.labels(model_name, reason)
        self._progress: dict[str, _Progress] = {}

    def observe(self, output: Any) -> None:
        """Feed one RequestOutput (engine thread). Observes TTFT once, ITL per step, the rest at finish."""
        m = getattr(output, "metrics", None)
        rid = output.request_id
        p = self._progress.setdefault(rid, _Progress())
        new_tokens = sum(len(c.token_ids) for c in output.outputs)  # outputs are deltas
        p.tokens += new_tokens
        if m is not None:
            if not p.saw_first_token and m.first_token_time is not None and m.arrival_time is not None:
                self.ttft.labels(self.model_name).observe(max(0.0, m.first_token_time - m.arrival_time))
                p.saw_first_token = True
            elif new_tokens and m.last_token_time is not None and p.last_token_time is not None:
                self.itl.labels(self.model_name).observe(max(0.0, m.last_token_time - p.last_token_time))
            if m.last_token_time is not None:
                p.last_token_time = m.last_token_time
        if output.finished:
            self._progress.pop(rid, None)
            reason = (output.outputs[0].finish_reason if output.outputs else None) or "abort"
            self.request_success.labels(self.model_name, reason).inc()
            self._observe_finished(output, m, p.tokens)
            if m is not None and m.arrival_time is not None:
                if m.finished_time is not None:
                    self.e2e.labels(self.model_name).observe(max(0.0, m.finished_time - m.arrival_time))
                if m.first_scheduled_time is not None:
                    self.queue.labels(self.model_name).observe(max(0.0, m.first_scheduled_time - m.arrival_time))

    def _observe_finished(self, output: Any, m: Any, generated: int) -> None:
        """vLLM's per-request distributions: sizes always; phase times where the request reached them."""
        name = self.model_name
        self.prompt_tokens.labels(name).observe(len(output.prompt_token_ids or ()))
        self.generation_tokens.labels(name).observe(generated)
        self.params_n.labels(name).observe(max(1, len(output.outputs)))
        if m is None or m.first_scheduled_time is None or m.first_token_time is None:
            return
        self.prefill_time.labels(name).observe(max(0.0, m.first_token_time - m.first_scheduled_time))
        if m.last_token_time is not None:
            self.decode_time.labels(name).observe(max(0.0, m.last_token_time - m.first_token_time))
            self.inference_time.labels(name).observe(max(0.0, m.last_token_time - m.first_scheduled_time))

    def observe_step(self, num_tokens: int) -> None:
        """Tokens the engine scheduled in one step (engine thread)."""
        if num_tokens:
            self.iteration_tokens.labels(self.model_name).observe(num_tokens)

    def on_constrained_request(self, kind: str) -> None:
        self.constrained_requests.labels(self.model_name, kind).inc()

    def on_abort(self, request_id: str) -> None:
        """An abort the engine reports no output for (client gone, shutdown): counted as finished_reason=abort."""
        self._progress.pop(request_id, None)
        self.request_success.labels(self.model_name, "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
