"""`transfer.wait_event`: a device wait that registered checks can abandon (a tensor-parallel rank 0 whose
worker died must fail its requests, not wait forever on work that waits on the dead rank)."""

from __future__ import annotations

import pytest

from kubellm.engine import transfer


class FakeEvent:
    def __init__(self, ready_after: int | None):
        self.ready_after = ready_after
        self.queries = 0
        self.synchronized = False

    def query(self) -> bool:
        self.queries += 1
        return self.ready_after is not None and self.queries > self.ready_after

    def synchronize(self) -> None:
        self.synchronized = True


def test_without_checks_it_is_a_plain_synchronize() -> None:
    event = FakeEvent(ready_after=None)
    transfer.wait_event(event)  # type: ignore[arg-type]
    assert event.synchronized and event.queries == 0


def test_with_a_check_it_polls_until_the_event_completes() -> None:
    calls = []
    check = lambda: calls.append(1)  # noqa: E731
    transfer.add_wait_check(check)
    try:
        event = FakeEvent(ready_after=50)
        transfer.wait_event(event)  # type: ignore[arg-type]
        assert event.queries == 51 and not event.synchronized
    finally:
        transfer.remove_wait_check(check)


def test_a_check_that_raises_ends_a_wait_that_would_never_end(monkeypatch) -> None:
    monkeypatch.setattr(transfer, "WAIT_CHECK_INTERVAL_S", 0.01)

    def worker_died() -> None:
        raise RuntimeError("tensor-parallel worker kubellm-tp1 exited")

    transfer.add_wait_check(worker_died)
    try:
        with pytest.raises(RuntimeError, match="kubellm-tp1 exited"):
            transfer.wait_event(FakeEvent(ready_after=None))  # type: ignore[arg-type]
    finally:
        transfer.remove_wait_check(worker_died)
    assert transfer._wait_checks == []
