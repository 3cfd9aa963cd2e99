"""Autoscaling decisions over metric samples: pure, clock passed in, so time series can be unit-tested.

Each sample yields a raw recommendation (HPA's formula per metric: ceil(ready × observed / target), the
largest wins). Stabilisation then keeps it calm, as the HPA does: scale up only to the *smallest*
recommendation seen over the scale-up window (so load must persist, and a spike does nothing), scale down
only to the *largest* recommendation seen over the scale-down delay (so a dip does nothing). To zero
only after the whole delay was idle; from zero at once when the router holds requests, because someone
is waiting.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

TOLERANCE = 0.1  # as the HPA: ignore ratios within 10% of the target


@dataclass(frozen=True)
class Policy:
    min_replicas: int
    max_replicas: int
    target_waiting: float  # waiting requests per replica
    target_kv: float  # 0-1 fraction, as vllm:kv_cache_usage_perc
    scale_up_window_s: float
    scale_down_delay_s: float


@dataclass(frozen=True)
class Sample:
    """What the operator saw at one tick: sums over ready engines, the router's held requests."""

    t: float
    ready: int  # engines that answered /metrics
    waiting: float = 0.0  # sum of vllm:num_requests_waiting
    running: float = 0.0  # sum of vllm:num_requests_running
    kv_usage: float = 0.0  # mean of vllm:kv_cache_usage_perc over ready engines
    router_queued: float = 0.0  # sum of kubellm_router_queued_requests for this model

    @property
    def idle(self) -> bool:
        return self.waiting == 0 and self.running == 0 and self.router_queued == 0


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str  # ScaleUpQueue | ScaleUpKVCache | ScaleDown | ScaleToZero | ScaleFromZero | MinReplicas | MaxReplicas
    message: str

    @property
    def direction(self) -> str:
        return "up" if self.reason in ("ScaleUpQueue", "ScaleUpKVCache", "ScaleFromZero", "MinReplicas") else "down"


def _ratio_replicas(ready: int, observed: float, target: float) -> int | None:
    """HPA's rule for one metric: None when within tolerance of the target (keep what we have)."""
    ratio = observed / target
    if abs(ratio - 1.0) <= TOLERANCE:
        return None
    return math.ceil(ready * ratio)


def recommend(policy: Policy, current: int, s: Sample) -> tuple[int, str]:
    """Raw (unstabilised) replica count for one sample, with the metric that drove it."""
    if current == 0 or s.ready == 0:
        if s.router_queued > 0 or s.waiting > 0:
            return max(1, policy.min_replicas, current), "ScaleFromZero"
        return current, "Steady"  # nothing measured: keep (pods may still be starting)
    if policy.min_replicas == 0 and s.idle:
        return 0, "ScaleToZero"
    per_replica_waiting = (s.waiting + s.router_queued) / s.ready
    by_queue = _ratio_replicas(s.ready, per_replica_waiting, policy.target_waiting)
    by_kv = _ratio_replicas(s.ready, s.kv_usage, policy.target_kv)
    if by_queue is None and by_kv is None:
        return current, "Steady"
    candidates = [(n, r) for n, r in ((by_queue, "ScaleUpQueue"), (by_kv, "ScaleUpKVCache")) if n is not None]
    n, reason = max(candidates, key=lambda c: c[0])
    # a metric within tolerance votes for the current count; never drop below it on the other's word alone
    if (by_queue is None or by_kv is None) and n < current:
        n = current
    n = max(n, 1 if s.running > 0 or s.waiting > 0 or s.router_queued > 0 else 0)
    if n == current:
        reason = "Steady"
    elif n < current:
        reason = "ScaleDown"
    return n, reason


@dataclass
class Autoscaler:
    """Stabilised decisions for one LLMDeployment; recreated (seeded with the current count) on restart."""

    policy: Policy
    current: int
    started: float
    history: deque[tuple[float, int, str]] = field(default_factory=deque)
    last_scale_time: float | None = None

    def __post_init__(self) -> None:
        # the count we found stands for the past: nothing scales until a full window disagrees with it
        self.history.append((self.started, self.current, "Seed"))

    def _clamp(self, n: int) -> int:
        return max(self.policy.min_replicas, min(self.policy.max_replicas, n))

    def observe(self, s: Sample) -> Decision | None:
        """Feed one sample; a Decision when the replica count should change now, else None."""
        p = self.policy
        if self.current < p.min_replicas:
            return self._apply(s.t, p.min_replicas, "MinReplicas", f"below minReplicas {p.min_replicas}")
        if self.current > p.max_replicas:
            return self._apply(s.t, p.max_replicas, "MaxReplicas", f"above maxReplicas {p.max_replicas}")
        raw, why = recommend(p, self.current, s)
        if raw < self.current and s.ready < self.current:
            raw, why = self.current, "Steady"  # replicas still starting: too little evidence to remove any
        raw = self._clamp(raw) if raw > 0 or p.min_replicas > 0 else 0
        self.history.append((s.t, raw, why))
        self._prune(s.t - max(p.scale_up_window_s, p.scale_down_delay_s))
        if why == "ScaleFromZero" and raw > self.current:
            return self._apply(s.t, raw, why, f"router holds {s.router_queued:g} requests; waking engines")
        up = self._window(s.t, p.scale_up_window_s)
        if up is not None and min(up) > self.current:
            target = min(up)
            drivers = [w for w in self._reasons_since(s.t - p.scale_up_window_s) if w.startswith("ScaleUp")]
            reason = drivers[-1] if drivers else "ScaleUpQueue"
            msg = (
                f"waiting={s.waiting:g} queued={s.router_queued:g} kv={s.kv_usage:.2f} over {s.ready} ready, "
                f"sustained {p.scale_up_window_s:g}s"
            )
            return self._apply(s.t, target, reason, msg)
        down = self._window(s.t, p.scale_down_delay_s)
        if down is not None and max(down) < self.current:
            target = max(down)
            if target == 0:
                return self._apply(s.t, 0, "ScaleToZero", f"idle for {p.scale_down_delay_s:g}s")
            msg = f"load below target for {p.scale_down_delay_s:g}s (kv={s.kv_usage:.2f}, waiting={s.waiting:g})"
            return self._apply(s.t, target, "ScaleDown", msg)
        return None

    def _prune(self, horizon: float) -> None:
        # keep the last entry at or before the horizon: it is the state in force when the window opens
        while len(self.history) > 1 and self.history[1][0] <= horizon:
            self.history.popleft()

    def _window(self, now: float, window: float) -> list[int] | None:
        """Recommendations in force over [now - window, now]; None until the history spans the window."""
        before = [r for t, r, _ in self.history if t <= now - window]
        if not before:
            return None
        return [before[-1]] + [r for t, r, _ in self.history if t > now - window]

    def _reasons_since(self, since: float) -> list[str]:
        return [w for t, _, w in self.history if t > since]

    def _apply(self, t: float, n: int, reason: str, message: str) -> Decision:
        old = self.current
        self.current = n
        self.last_scale_time = t
        # restart the windows from the new count: decisions about it need fresh evidence
        self.history.clear()
        self.history.append((t, n, reason))
        return Decision(n, reason, f"{old} -> {n}: {message}")

    def reconfigure(self, policy: Policy) -> None:
        self.policy = policy
