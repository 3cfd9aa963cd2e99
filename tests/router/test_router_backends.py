"""Backend registry: discovery diffs, circuit breaker states, saturation, change notification."""

from __future__ import annotations

import asyncio
import time

from hypothesis import given
from hypothesis import strategies as st

from kubellm.router.backends import BackendRegistry, EndpointInfo, _metric_value
from kubellm.router.metrics import RouterMetrics


def registry(**kw) -> BackendRegistry:
    return BackendRegistry(["m"], RouterMetrics(), **kw)


def test_set_endpoints_adds_updates_and_removes():
    reg = registry()
    added, removed = [], []
    reg.on_added.append(lambda b: added.append(b.url))
    reg.on_removed.append(lambda b: removed.append(b.url))
    reg.set_endpoints([EndpointInfo("http://a:1/"), EndpointInfo("http://b:1")])
    assert added == ["http://a:1", "http://b:1"]
    slot_a = reg.backends["http://a:1"].slot
    reg.set_endpoints([EndpointInfo("http://a:1", ready=False), EndpointInfo("http://c:1")])
    assert removed == ["http://b:1"] and reg.backends["http://a:1"].slot == slot_a
    assert [b.url for b in reg.routable("m")[0]] == ["http://c:1"]
    reg.set_endpoints([EndpointInfo("http://b:1")])
    assert reg.backends["http://b:1"].slot not in (slot_a, 0, 1)  # slots are never reused


def test_models_pinned_or_learned():
    reg = registry()
    reg.set_endpoints([EndpointInfo("http://a:1", models=frozenset({"x"})), EndpointInfo("http://b:1")])
    assert [b.url for b in reg.routable("x")[0]] == ["http://a:1"]
    assert [b.url for b in reg.routable("m")[0]] == ["http://b:1"]  # unknown models: serves the configured ones
    reg.backends["http://b:1"].served_models = frozenset({"y"})
    assert reg.knows_model("y") and not reg.knows_model("z") and reg.model_ids() == ["m", "x", "y"]


def test_breaker_opens_half_opens_once_and_closes():
    reg = registry(breaker_threshold=2, breaker_cooldown=0.05)
    reg.set_endpoints([EndpointInfo("http://a:1")])
    b = reg.backends["http://a:1"]
    for _ in range(2):
        reg.acquire(b)
        reg.record_failure(b)
        reg.release(b)
    assert not b.takes_requests(time.monotonic())
    deadline = time.monotonic() + 5
    while not b.takes_requests(time.monotonic()):  # half-open once the 50 ms cooldown is over
        assert time.monotonic() < deadline, "the breaker never half-opened"
        time.sleep(0.005)
    reg.acquire(b)  # the trial
    assert not b.takes_requests(time.monotonic())  # one trial at a time
    reg.release(b)  # cancelled by its client: no verdict, another trial may go
    assert b.takes_requests(time.monotonic())
    reg.acquire(b)
    reg.record_success(b)
    reg.release(b)
    assert b.breaker_open_until == 0 and b.takes_requests(time.monotonic())


def test_connect_error_ejects_at_once():
    reg = registry()
    reg.set_endpoints([EndpointInfo("http://a:1")])
    b = reg.backends["http://a:1"]
    reg.record_failure(b, connect_error=True)
    assert not b.healthy and reg.routable("m")[0] == []
    reg.set_healthy(b, True)
    assert reg.routable("m")[0] == [b]


def test_saturation_is_reported():
    reg = registry(max_inflight=1)
    reg.set_endpoints([EndpointInfo("http://a:1")])
    b = reg.backends["http://a:1"]
    reg.acquire(b)
    assert reg.routable("m") == ([], True)


def test_requests_count_as_answering_from_their_first_byte_until_release():
    reg = registry()
    reg.set_endpoints([EndpointInfo("http://a:1")])
    b = reg.backends["http://a:1"]
    reg.acquire(b)
    reg.acquire(b)
    reg.answered(b)  # one request streams; the other still waits for its first byte
    assert (b.in_flight, b.answering) == (2, 1)
    reg.release(b, answered=False)
    reg.release(b, answered=True)
    assert (b.in_flight, b.answering) == (0, 0)


async def test_release_wakes_waiters():
    reg = registry()
    reg.set_endpoints([EndpointInfo("http://a:1")])
    b = reg.backends["http://a:1"]
    reg.acquire(b)
    waiter = asyncio.create_task(reg.wait_changed(5))
    deadline = time.monotonic() + 5
    while reg._waiters < 1:  # the waiter is waiting (only then can a release wake it)
        assert time.monotonic() < deadline
        await asyncio.sleep(0.001)
    t0 = time.monotonic()
    reg.release(b)
    await waiter
    assert time.monotonic() - t0 < 1


def test_metric_parsing_sums_label_sets():
    text = 'vllm:num_requests_waiting{model_name="a"} 2.0\nvllm:num_requests_waiting{model_name="b"} 3\nother 9\n'
    assert _metric_value(text, "vllm:num_requests_waiting") == 5.0
    assert _metric_value(text, "missing") is None


@given(
    states=st.lists(
        st.tuples(
            st.booleans(),
            st.booleans(),
            st.booleans(),
            st.booleans(),  # removed, ready, terminating, healthy
            st.sampled_from([0.0, -5.0, 5.0]),
            st.booleans(),  # breaker open until (now +), half-open trial
            st.sampled_from([None, frozenset(), frozenset({"m"}), frozenset({"x"})]),  # pinned models
            st.sampled_from([None, frozenset({"m"}), frozenset({"x", "m"}), frozenset({"x"})]),  # served models
            st.integers(0, 4),  # in flight
        ),
        max_size=10,
    ),
    configured=st.sampled_from([frozenset(), frozenset({"m"}), frozenset({"x"})]),
    model=st.sampled_from(["m", "x"]),
    max_inflight=st.sampled_from([0, 2]),
    exclude=st.lists(st.integers(0, 9), max_size=3),
)
def test_routable_agrees_with_each_backends_own_rules(states, configured, model, max_inflight, exclude):
    """routable() inlines takes_requests and serves for speed; it must keep their meaning exactly."""
    reg = BackendRegistry(configured, RouterMetrics(), max_inflight=max_inflight)
    reg.set_endpoints([EndpointInfo(f"http://b{i}:1") for i in range(len(states))])
    now = time.monotonic()
    for b, (removed, ready, term, healthy, until, half, pinned, served, n) in zip(
        reg.backends.values(), states, strict=True
    ):
        b.removed, b.ready, b.terminating, b.healthy = removed, ready, term, healthy
        b.breaker_open_until = now + until if until else 0.0
        b.half_open_trial, b.pinned_models, b.served_models, b.in_flight = half, pinned, served, n
    got, saturated = reg.routable(model, exclude=exclude)
    now = time.monotonic()  # (the breakers' times are 5 s away: a few microseconds later decides the same)
    usable = [
        b for b in reg.backends.values()
        if b.slot not in exclude and b.takes_requests(now) and b.serves(model, configured)
    ]  # fmt: skip
    assert got == [b for b in usable if not max_inflight or b.in_flight < max_inflight]
    assert saturated == any(max_inflight and b.in_flight >= max_inflight for b in usable)


_FIELD_VALUES = {
    "removed": [False, True],
    "ready": [True, False],
    "terminating": [False, True],
    "healthy": [True, False],
    "pinned_models": [None, frozenset({"m"}), frozenset({"x"})],
    "served_models": [None, frozenset({"m"}), frozenset({"x"})],
    "breaker_open_until": ["closed", "open", "expired"],
    "half_open_trial": [False, True],
}


@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("set"), st.integers(0, 5), st.sampled_from(sorted(_FIELD_VALUES)), st.integers(0, 2)),
            st.tuples(st.just("endpoints"), st.sets(st.integers(0, 5), max_size=6), st.booleans(), st.just(0)),
            st.tuples(st.just("route"), st.integers(0, 5), st.booleans(), st.just(0)),  # acquire, maybe fail, release
        ),
        max_size=25,
    ),
    model=st.sampled_from(["m", "x"]),
)
def test_routable_slots_kept_between_changes_equals_routable(steps, model):
    """routable_slots keeps each model's list between changes: after any sequence of field assignments (as the health
    checker, discovery, breakers and tests make them), endpoint changes and routed requests, it answers what
    routable() computes from scratch, slots included."""
    reg = registry()
    reg.set_endpoints([EndpointInfo(f"http://b{i}:1") for i in range(4)])
    for kind, i, arg, value in steps:
        backends = list(reg.backends.values())
        if kind == "set" and backends:
            b = backends[i % len(backends)]
            v = _FIELD_VALUES[arg][value % len(_FIELD_VALUES[arg])]
            if arg == "breaker_open_until":
                v = {"closed": 0.0, "open": time.monotonic() + 60, "expired": time.monotonic() - 1}[v]
            setattr(b, arg, v)
        elif kind == "endpoints":
            reg.set_endpoints([EndpointInfo(f"http://b{j}:1", ready=arg) for j in sorted(i)])
        elif kind == "route" and backends:
            b = backends[i % len(backends)]
            reg.acquire(b)
            if arg:
                reg.record_failure(b)
            else:
                reg.record_success(b)
            reg.release(b)
        got, slots = reg.routable_slots(model)
        want, _ = reg.routable(model)
        assert got == want and slots == [b.slot for b in want]


def test_routable_slots_follows_a_breaker_that_expires(monkeypatch):
    """A list that depends on the clock (an open breaker half-opens when its time is up) is never kept."""
    import kubellm.router.backends as backends_module

    now = [100.0]

    class Clock:
        @staticmethod
        def monotonic() -> float:
            return now[0]

    monkeypatch.setattr(backends_module, "time", Clock)
    reg = registry()
    reg.set_endpoints([EndpointInfo("http://a:1"), EndpointInfo("http://b:1")])
    a, b = reg.backends.values()
    a.breaker_open_until = 110.0
    assert reg.routable_slots("m") == ([b], [b.slot])
    assert reg.routable_slots("m") == ([b], [b.slot])
    now[0] = 111.0  # the breaker half-opens: one trial request may go to a
    assert reg.routable_slots("m") == ([a, b], [a.slot, b.slot])
