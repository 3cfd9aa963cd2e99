"""What every routing policy sees and returns: pure data, no I/O, so policies are unit-testable."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kubellm.block_hash import DEFAULT_BLOCK_SIZE
from kubellm.routing import RoutingPolicy


@dataclass(slots=True)
class Candidate:
    """One routable replica as the policy sees it."""

    key: str  # the backend's URL
    in_flight: int = 0  # requests this router has open on it
    answering: int = 0  # of those, the ones whose first byte came back (decoding, not queued or in prefill)
    waiting: int = 0  # the engine's own queue (vllm:num_requests_waiting), from the last probe
    matched_blocks: int = 0  # leading prompt blocks this replica holds (prefix policy only)
    footprint: int = 0  # distinct blocks the router has placed on it: its share of the working set (prefix only)


# A candidate as a plain tuple, what the router's hot path builds instead of a Candidate (a tuple costs a fraction of a
# dataclass's construction, once per replica per request): (key, in_flight, answering, waiting, matched_blocks,
# footprint, payload), the fields in Candidate's order, then whatever the caller wants back with the pick.
Row = tuple[str, int, int, int, int, int, Any]


@dataclass(slots=True)
class RouteRequest:
    model: str
    session_key: str | None = None
    num_blocks: int = 0  # full blocks in the prompt (for the match ratio)
    block_tokens: int = DEFAULT_BLOCK_SIZE  # tokens per block (for a minimum match given in tokens)


@dataclass(slots=True)
class Decision:
    key: str
    reason: str  # prefix_hit | load_spill | short_match | no_match | session | no_session | round_robin | least_load
    matched_blocks: int = 0


def load_cap(candidates: Sequence[Candidate], balance_factor: float, floor: int = 0) -> int:
    """Bounded loads: after this request no replica may hold more than ceil(c × mean in-flight), or `floor`
    requests when that is larger (one replica running 3 requests while another runs 1 is no imbalance worth
    losing a cache hit over: an engine batches hundreds)."""
    total = sum(c.in_flight for c in candidates) + 1
    return max(1, floor, math.ceil(balance_factor * total / len(candidates)))


def within_bound(candidates: Sequence[Candidate], balance_factor: float, floor: int = 0) -> list[Candidate]:
    """The replicas that may take one more request; never empty (the least loaded always fits).

    A replica above the cap still qualifies while every request it holds has started answering: it keeps up,
    and sending its prefix elsewhere would only turn a cache hit into a full prefill there. The bound binds
    once a request waits on it for its first byte (queued or in prefill)."""
    cap = load_cap(candidates, balance_factor, floor)
    eligible = [c for c in candidates if c.in_flight + 1 <= cap or c.answering >= c.in_flight]
    return eligible or [min(candidates, key=lambda c: c.in_flight)]


class Policy(ABC):
    name: RoutingPolicy

    def __init__(self) -> None:
        self._turn = 0  # rotates ties so equal replicas share work instead of the first one taking it all

    @abstractmethod
    def choose(self, request: RouteRequest, candidates: Sequence[Candidate]) -> Decision:
        """Pick one of `candidates` (non-empty)."""

    def choose_row(self, request: RouteRequest, rows: Sequence[Row]) -> tuple[Row, str, int]:
        """`choose` over candidates given as Rows (non-empty, distinct keys): the row picked, the reason, the matched
        blocks. A policy whose choice is on the hot path implements it natively; this one goes through `choose`."""
        d = self.choose(request, [Candidate(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows])
        for r in rows:
            if r[0] == d.key:
                return r, d.reason, d.matched_blocks
        raise ValueError(f"{type(self).__name__} chose {d.key!r}, not a candidate")

    def _rotated(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        self._turn += 1
        k = self._turn % len(candidates)
        return [*candidates[k:], *candidates[:k]]

    def _least_loaded(self, candidates: Sequence[Candidate]) -> Candidate:
        return min(self._rotated(candidates), key=lambda c: c.in_flight + c.waiting)
