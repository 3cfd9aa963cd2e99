"""Autoscaler decisions over metric time series (pure: the clock is the sample's t)."""

from __future__ import annotations

from kubellm.operator.autoscaler import Autoscaler, Policy, Sample, recommend

POLICY = Policy(min_replicas=1, max_replicas=8, target_waiting=4, target_kv=0.8, scale_up_window_s=30,
                scale_down_delay_s=300)  # fmt: skip


def run(scaler: Autoscaler, series: list[Sample]) -> list[tuple[float, int, str]]:
    out = []
    for s in series:
        d = scaler.observe(s)
        if d is not None:
            out.append((s.t, d.replicas, d.reason))
    return out


def every(step: float, start: float, end: float, **load: float):
    t = start
    while t < end:
        yield t, load
        t += step


def series(ready_of, *parts) -> list[Sample]:
    out = []
    for part in parts:
        for t, load in part:
            out.append(Sample(t=t, ready=ready_of(t), **load))
    return out


def test_scale_up_on_sustained_queueing():
    scaler = Autoscaler(POLICY, current=2, started=0)
    samples = series(lambda t: 2, every(5, 0, 100, waiting=0, running=8, kv_usage=0.5),
                     every(5, 100, 200, waiting=24, running=16, kv_usage=0.7))  # fmt: skip
    decisions = run(scaler, samples)
    assert decisions[0][1:] == (6, "ScaleUpQueue")  # 24 waiting / 4 per replica
    assert 130 <= decisions[0][0] <= 135  # only once the queue persisted the 30 s window
    assert scaler.last_scale_time == decisions[0][0]


def test_no_flapping_on_a_spike():
    scaler = Autoscaler(POLICY, current=2, started=0)
    calm = dict(waiting=0, running=6, kv_usage=0.5)
    samples = series(lambda t: 2, every(5, 0, 100, **calm), every(5, 100, 110, waiting=40, running=16, kv_usage=0.95),
                     every(5, 110, 1000, **calm))  # fmt: skip
    assert run(scaler, samples) == []  # not up on the spike, and no down either (kv 0.5 within budget of 2)


def test_kv_cache_pressure_scales_up():
    scaler = Autoscaler(POLICY, current=2, started=0)
    samples = series(lambda t: 2, every(5, 0, 60, waiting=0, running=30, kv_usage=0.98))
    ((_, n, reason),) = run(scaler, samples)[:1]
    assert reason == "ScaleUpKVCache" and n == 3  # ceil(2 * 0.98 / 0.8)


def test_down_to_min_only_after_the_delay():
    scaler = Autoscaler(POLICY, current=6, started=0)
    samples = series(lambda t: 6, every(10, 0, 1000, waiting=0, running=1, kv_usage=0.1))
    decisions = run(scaler, samples)
    assert decisions[0][0] >= 300  # not before scaleDownDelaySeconds of low load
    assert decisions[0][1:] == (1, "ScaleDown")
    assert all(n >= POLICY.min_replicas for _, n, _ in decisions)


def test_a_dip_within_the_delay_does_not_scale_down():
    scaler = Autoscaler(POLICY, current=4, started=0)
    busy = dict(waiting=16, running=16, kv_usage=0.8)
    samples = series(lambda t: 4, every(10, 0, 200, **busy), every(10, 200, 400, waiting=0, running=0, kv_usage=0),
                     every(10, 400, 700, **busy))  # fmt: skip
    assert [d for d in run(scaler, samples) if d[2] == "ScaleDown"] == []


def test_to_zero_after_idle_delay_and_back_on_router_queue():
    policy = Policy(0, 4, 4, 0.8, scale_up_window_s=30, scale_down_delay_s=120)
    scaler = Autoscaler(policy, current=1, started=0)
    ready = {"n": 1}
    samples = []
    samples += series(lambda t: 1, every(10, 0, 60, waiting=0, running=2, kv_usage=0.2))
    samples += series(lambda t: 1, every(10, 60, 300, waiting=0, running=0, kv_usage=0.0))
    decisions = run(scaler, samples)
    assert decisions == [(180, 0, "ScaleToZero")]  # 120 s after the last request finished at t=50..60
    ready["n"] = 0
    # no engine, nothing queued: stays at zero
    assert run(scaler, series(lambda t: 0, every(10, 300, 400))) == []
    # the router holds a request: one replica comes back at once (no window: someone is waiting)
    d = scaler.observe(Sample(t=400, ready=0, router_queued=3))
    assert d is not None and d.replicas == 1 and d.reason == "ScaleFromZero"


def test_from_zero_respects_min_when_min_is_above_zero_later():
    policy = Policy(0, 4, 4, 0.8, 30, 120)
    scaler = Autoscaler(policy, current=0, started=0)
    scaler.reconfigure(Policy(2, 4, 4, 0.8, 30, 120))
    d = scaler.observe(Sample(t=1, ready=0))
    assert d is not None and (d.replicas, d.reason) == (2, "MinReplicas")


def test_max_replicas_clamps_and_lowering_max_scales_down_now():
    scaler = Autoscaler(POLICY, current=2, started=0)
    decisions = run(scaler, series(lambda t: 2, every(5, 0, 100, waiting=400, running=10, kv_usage=0.9)))
    assert decisions[0][1] == 8
    scaler.reconfigure(Policy(1, 3, 4, 0.8, 30, 300))
    d = scaler.observe(Sample(t=101, ready=8, waiting=400))
    assert d is not None and (d.replicas, d.reason) == (3, "MaxReplicas")


def test_restart_seeds_from_the_live_count_and_waits_a_full_window():
    # a restarted operator must not act on one sample: it has no history
    scaler = Autoscaler(POLICY, current=3, started=1000)
    assert scaler.observe(Sample(t=1000, ready=3, waiting=100)) is None
    assert scaler.observe(Sample(t=1010, ready=3, waiting=100)) is None
    assert scaler.observe(Sample(t=1031, ready=3, waiting=100)) is not None


def test_starting_replicas_are_not_counted_as_idle_capacity():
    scaler = Autoscaler(POLICY, current=4, started=0)
    # only 1 of 4 is ready yet, and it is idle: no scale-down on such thin evidence
    assert run(scaler, series(lambda t: 1, every(10, 0, 1000, waiting=0, running=0, kv_usage=0.0))) == []


def test_recommend_tolerance_keeps_count_near_target():
    assert recommend(POLICY, 2, Sample(t=0, ready=2, waiting=8.4, running=4, kv_usage=0.5)) == (2, "Steady")
    n, reason = recommend(POLICY, 2, Sample(t=0, ready=2, waiting=12, running=4, kv_usage=0.5))
    assert (n, reason) == (3, "ScaleUpQueue")
