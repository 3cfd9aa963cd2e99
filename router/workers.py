"""`kubellm router --workers N`: N router processes on one port, one per CPU the pod may use.

Each worker is a whole router (its own discovery, health probes, KV-event subscriptions and prefix index; the
index converges from the engines' events, so workers need no shared state) listening with SO_REUSEPORT: the
kernel spreads connections across them. The parent holds the port bound (not listening) for the whole run, so
nothing else can take it while a worker restarts, and it restarts a worker that dies. It also reads each worker's
metric samples every `scrape_interval` seconds, so what a worker that dies had counted stays in the merged
/metrics (router/metrics.py: retired.json).
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import wait as wait_sentinels
from pathlib import Path
from typing import Any

log = logging.getLogger("kubellm.router.workers")

_CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
_CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
RESTART_LIMIT = 5  # a worker that dies this many times in a row within FAST_DEATH_S of its start stops the router
FAST_DEATH_S = 2.0


def cgroup_cpu_limit(cpu_max: str | None = None, quota: str | None = None, period: str | None = None) -> float | None:
    """CPUs of the cgroup's CFS quota (cgroup v2 `cpu.max` "QUOTA PERIOD", else v1 quota/period), None if unlimited."""
    if cpu_max is not None:
        parts = cpu_max.split()
        if len(parts) == 2 and parts[0] != "max":
            try:
                q, p = int(parts[0]), int(parts[1])
            except ValueError:
                return None
            return q / p if q > 0 and p > 0 else None
        return None
    if quota is not None and period is not None:
        try:
            q, p = int(quota), int(period)
        except ValueError:
            return None
        return q / p if q > 0 and p > 0 else None
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def default_workers() -> int:
    """The CPUs this process may use: its cgroup CPU limit rounded up, capped by the affinity mask."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(_read(_CGROUP_V2_CPU_MAX))
    if limit is None:
        limit = cgroup_cpu_limit(quota=_read(_CGROUP_V1_QUOTA), period=_read(_CGROUP_V1_PERIOD))
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def hold_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) a SO_REUSEPORT socket on host:port; raises OSError if the port is taken.
    A bound socket that never listens receives no connections but keeps the port ours between worker restarts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host or "0.0.0.0", port))
    except OSError:
        s.close()
        raise
    return s


@dataclass
class WorkerSlot:
    index: int
    process: Any = None  # multiprocessing.Process
    started_at: float = 0.0
    fast_deaths: int = 0


def scrape_worker(socket_path: str, timeout: float = 1.0) -> list[dict[str, Any]] | None:
    """GET /metrics/local from a worker over its unix socket (blocking, bounded); None if it does not answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(socket_path)
            s.sendall(b"GET /metrics/local HTTP/1.0\r\nHost: worker\r\n\r\n")
            data = bytearray()
            while piece := s.recv(65536):
                data += piece
    except OSError:
        return None
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
        return None
    try:
        snap = json.loads(body)
    except ValueError:
        return None
    return snap if isinstance(snap, list) else None


class Supervisor:
    """Starts `n` workers (target(config, index, metrics_dir, ready)), restarts those that die, stops them all
    on SIGTERM/SIGINT."""

    def __init__(self, config: Any, n: int, target: Callable[..., None], scrape_interval: float = 1.0):
        self.config = config
        self.n = n
        self.target = target
        self.scrape_interval = scrape_interval
        self._next_scrape = 0.0
        self.metrics_dir = tempfile.mkdtemp(prefix="kubellm-router-")
        self.slots = [WorkerSlot(i) for i in range(n)]
        self._ctx = multiprocessing.get_context("fork")  # no threads or event loop exist yet in the parent
        self._stopping = False

    def _start(self, slot: WorkerSlot) -> Any:
        ready = self._ctx.Event()
        p = self._ctx.Process(
            target=self.target, args=(self.config, slot.index, self.metrics_dir, ready), name=f"router-{slot.index}"
        )
        p.start()
        slot.process, slot.started_at = p, time.monotonic()
        return ready

    def run(self, on_ready: Callable[[], None]) -> int:
        def stop(*_: object) -> None:
            self._stopping = True

        old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            readies = [self._start(s) for s in self.slots]
            while not self._stopping and not all(r.is_set() for r in readies):
                if any(s.process.exitcode is not None for s in self.slots):
                    log.error("a router worker exited during start-up")
                    return 1
                time.sleep(0.02)
            if not self._stopping:
                on_ready()
            while not self._stopping:
                wait_sentinels([s.process.sentinel for s in self.slots], timeout=0.2)
                if time.monotonic() >= self._next_scrape:
                    self._scrape()
                for slot in self.slots:
                    if self._stopping or slot.process.exitcode is None:
                        continue
                    code = slot.process.exitcode
                    self._retire(slot)
                    slot.fast_deaths = slot.fast_deaths + 1 if time.monotonic() - slot.started_at < FAST_DEATH_S else 1
                    if slot.fast_deaths >= RESTART_LIMIT:
                        log.error("router worker %d keeps dying (exit code %s); stopping", slot.index, code)
                        return 1
                    log.warning("router worker %d exited with code %s; restarting it", slot.index, code)
                    self._start(slot)
            return 0
        finally:
            self._stop_all()
            for sig, handler in old.items():
                signal.signal(sig, handler)
            for f in Path(self.metrics_dir).glob("*"):
                f.unlink(missing_ok=True)
            os.rmdir(self.metrics_dir)

    def scrape_path(self, index: int) -> str:
        return os.path.join(self.metrics_dir, f"scrape-{index}.json")

    def _scrape(self) -> None:
        """Each live worker's samples, kept in the folder (scrape-<index>.json) until the next scrape."""
        for slot in self.slots:
            if slot.process is not None and slot.process.exitcode is None:
                snap = scrape_worker(WorkerPlacement(slot.index, self.metrics_dir).socket_path())
                if snap is not None:
                    path = self.scrape_path(slot.index)
                    with open(path + ".tmp", "w") as f:
                        json.dump(snap, f)
                    os.replace(path + ".tmp", path)
        self._next_scrape = time.monotonic() + self.scrape_interval

    def _retire(self, slot: WorkerSlot) -> None:
        """A worker died: keep what it counted (its own final samples if it stopped cleanly, else our last scrape)."""
        from kubellm.router.metrics import final_path, fold_retired

        snap = None
        for path in (final_path(self.metrics_dir, slot.process.pid), self.scrape_path(slot.index)):
            try:
                with open(path) as f:
                    snap = snap or json.load(f)
            except (OSError, ValueError):
                continue
            os.unlink(path)
        if snap:
            try:
                fold_retired(self.metrics_dir, snap)
            except OSError as e:
                log.warning("could not keep the metrics of router worker %d: %s", slot.index, e)

    def _stop_all(self) -> None:
        procs = [s.process for s in self.slots if s.process is not None]
        for p in procs:
            if p.exitcode is None:
                p.terminate()  # SIGTERM: the worker stops accepting and finishes its requests' cleanup
        deadline = time.monotonic() + 10
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.exitcode is None:
                p.kill()
                p.join()


def worker_config(config: Any, port: int) -> Any:
    """A worker's copy of the config: the port the parent holds."""
    return replace(config, port=port)


@dataclass(frozen=True)
class WorkerPlacement:
    """Which worker this process is, and the folder where workers meet to merge their metrics."""

    index: int
    metrics_dir: str

    def socket_path(self, index: int | None = None) -> str:
        return os.path.join(self.metrics_dir, f"worker-{self.index if index is None else index}.sock")

    def peer_socket_paths(self) -> list[str]:
        own = self.socket_path()
        return sorted(str(p) for p in Path(self.metrics_dir).glob("worker-*.sock") if str(p) != own)
