"""Render the engine dashboard's panels from real scraped metrics into a PNG (docs/dashboard-engine.png).

Grafana cannot be installed here, so this plays its part for one dashboard: it starts a local engine
(`kubellm serve --device sim` by default, or scrapes --engine URL), drives chat requests at it, scrapes
/metrics every --interval seconds, and evaluates each panel's queries over the scrapes the way Prometheus
would for the shapes our dashboards use: a gauge as is, `rate(counter)` as the delta over the step, a
ratio of two rates, and `histogram_quantile(q, rate(..._bucket))` over bucket deltas. The panel titles,
queries and layout come from charts/kubellm/dashboards/engine.json itself.

    python bench/render_dashboard.py                       # start a sim engine, load it, write the PNG
    python bench/render_dashboard.py --engine http://127.0.0.1:8000 --duration 60
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "charts" / "kubellm" / "dashboards" / "engine.json"
METRIC = re.compile(r"(?<![A-Za-z0-9_:])((?:vllm|kubellm)[:_][A-Za-z0-9_:]*)")


@dataclass
class Scrape:
    t: float
    # series name -> list of (labels, value)
    samples: dict[str, list[tuple[dict[str, str], float]]]

    def total(self, name: str, **match: str) -> float:
        return sum(v for labels, v in self.samples.get(name, []) if all(labels.get(k) == x for k, x in match.items()))

    def buckets(self, family: str) -> dict[float, float]:
        out: dict[float, float] = defaultdict(float)
        for labels, v in self.samples.get(family + "_bucket", []):
            out[float(labels["le"])] += v
        return dict(out)


def scrape(url: str) -> Scrape:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[s.name].append((dict(s.labels), float(s.value)))
    return Scrape(time.time(), dict(samples))


def quantile(q: float, deltas: dict[float, float]) -> float | None:
    """histogram_quantile over cumulative bucket counts (linear interpolation inside the bucket)."""
    bounds = sorted(deltas)
    if not bounds or deltas[bounds[-1]] <= 0:
        return None
    rank = q * deltas[bounds[-1]]
    prev_bound, prev_count = 0.0, 0.0
    for b in bounds:
        c = deltas[b]
        if c >= rank:
            if b == float("inf"):
                return prev_bound
            return prev_bound + (b - prev_bound) * ((rank - prev_count) / max(c - prev_count, 1e-12))
        prev_bound, prev_count = b, c
    return prev_bound


def evaluate(expr: str, a: Scrape, b: Scrape) -> float | None:
    """One query's value at scrape b (rates over the step a -> b), for the shapes our dashboards use."""
    dt = max(b.t - a.t, 1e-6)
    names = METRIC.findall(expr)
    m = re.match(r"histogram_quantile\(([\d.]+)", expr)
    if m:
        family = names[0].removesuffix("_bucket")
        ba, bb = a.buckets(family), b.buckets(family)
        return quantile(float(m.group(1)), {k: bb[k] - ba.get(k, 0.0) for k in bb})
    rates = [(b.total(n) - a.total(n)) / dt for n in names]
    if "rate(" in expr and " / " in expr and len(rates) == 2:
        return rates[0] / rates[1] if rates[1] > 0 else None
    if "rate(" in expr:
        return rates[0]
    return b.total(names[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_engine(device: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "kubellm.cli", "serve", "--device", device, "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"engine exited: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("engine did not become healthy")


def load(url: str, model: str, stop: threading.Event, concurrency: int) -> None:
    """Chat requests with shared system prompts (so the prefix cache has something to hit) and varied lengths."""
    systems = [f"You are assistant {i}. " + "Answer briefly and precisely. " * 20 for i in range(3)]

    def worker(k: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            body = {
                "model": model,
                "messages": [
                    {"role": "system", "content": systems[(k + n) % len(systems)]},
                    {"role": "user", "content": f"Question {k}-{n}: name a colour."},
                ],
                "max_tokens": 16 + (n * 7 + k) % 48,
            }
            req = urllib.request.Request(
                url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            try:
                urllib.request.urlopen(req, timeout=120).read()
            except OSError:
                time.sleep(0.5)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()


def render(scrapes: list[Scrape], out: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p["type"] == "timeseries"]
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(18, 3.2 * rows), squeeze=False)
    t0 = scrapes[0].t
    for ax, panel in zip(axes.flat, panels, strict=False):
        for target in panel["targets"]:
            xs, ys = [], []
            for a, b in itertools.pairwise(scrapes):
                v = evaluate(target["expr"], a, b)
                if v is not None:
                    xs.append(b.t - t0)
                    ys.append(v)
            label = re.sub(r"\{\{[^}]*\}\}\s*", "", target["legendFormat"]).strip() or METRIC.findall(target["expr"])[0]
            ax.plot(xs, ys, label=label, linewidth=1.4)
        unit = panel["fieldConfig"]["defaults"].get("unit", "")
        ax.set_title(panel["title"], fontsize=10, loc="left")
        ax.set_xlabel("seconds", fontsize=8)
        ax.set_ylabel(
            {"s": "seconds", "percentunit": "fraction", "reqps": "req/s", "ops": "/s"}.get(unit, ""), fontsize=8
        )
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"{dash['title']}: panels rendered from scraped /metrics (not Grafana). {subtitle}", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", help="scrape this engine instead of starting one")
    p.add_argument("--device", default="sim", help="device of the engine this script starts")
    p.add_argument("--duration", type=float, default=90.0)
    p.add_argument("--interval", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard-engine.png")
    args = p.parse_args(argv)

    proc = None
    url = args.engine
    if url is None:
        proc, url = start_engine(args.device)
    stop = threading.Event()
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
            model = json.loads(r.read())["data"][0]["id"]
        load(url, model, stop, args.concurrency)
        scrapes = []
        deadline = time.time() + args.duration
        while time.time() < deadline:
            scrapes.append(scrape(url))
            time.sleep(args.interval)
        stop.set()
        how = f"engine {model} on device {args.device}" if proc else f"engine {model} at {url}"
        render(scrapes, args.out, f"{how}, {args.concurrency} concurrent chat clients, {args.duration:.0f} s")
        print(f"wrote {args.out}")
    finally:
        stop.set()
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
