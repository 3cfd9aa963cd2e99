"""Round robin over the routable replicas, in a stable order."""

from __future__ import annotations

from collections.abc import Sequence

from kubellm.router.policies.base import Candidate, Decision, Policy, RouteRequest
from kubellm.routing import RoutingPolicy


class RoundRobinPolicy(Policy):
    name = RoutingPolicy.ROUND_ROBIN

    def __init__(self) -> None:
        super().__init__()
        self._next = 0

    def choose(self, request: RouteRequest, candidates: Sequence[Candidate]) -> Decision:
        ordered = sorted(candidates, key=lambda c: c.key)
        pick = ordered[self._next % len(ordered)]
        self._next += 1
        return Decision(pick.key, "round_robin")
