"""One replica's load as a router sees it: its own in-flight requests combined with the engine's `load` lines.

A router (and each `--workers` process) knows only the requests it sent itself; several routers in front of
one fleet each see a share. The engine's `load` line (GUIDE section 2) counts every request it holds, whoever
sent it, but is up to ~50 ms old. Combined: the engine's count at the line, plus what this router has sent
(or finished) since, and never less than this router's own count. Pure logic: tested without sockets.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubellm.kv_events import LoadEvent


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """The last load line of a replica, with this router's own in-flight count when it arrived."""

    running: int
    waiting: int
    free_blocks: int
    local_in_flight_then: int

    @classmethod
    def of(cls, event: LoadEvent, local_in_flight: int) -> EngineLoad:
        return cls(event.running, event.waiting, event.free_blocks, local_in_flight)


@dataclass(frozen=True, slots=True)
class LoadView:
    in_flight: int  # requests on the replica, all routers' (the bounded-load rule's count)
    answering: int  # of those, the ones past queueing and prefill
    waiting: int  # queued there and not yet counted in in_flight (0 when in_flight is the engine's own count)


def combined_load(
    local_in_flight: int, local_answering: int, probed_waiting: int, engine: EngineLoad | None
) -> LoadView:
    """What the policy sees of one replica. Without a live load line: this router's own view, plus the waiting
    queue its last metrics probe saw. With one: the engine's whole count, moved by this router's sends since."""
    if engine is None:
        return LoadView(local_in_flight, local_answering, probed_waiting)
    since = local_in_flight - engine.local_in_flight_then  # ours sent (+) or finished (-) since the line
    total = max(local_in_flight, engine.running + engine.waiting + since)
    queued = max(engine.waiting, local_in_flight - local_answering)  # ours without a first byte are not answering
    return LoadView(total, max(0, total - queued), 0)
