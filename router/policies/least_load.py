"""Least load: the router's own in-flight count plus the engine-reported waiting queue."""

from __future__ import annotations

from collections.abc import Sequence

from kubellm.router.policies.base import Candidate, Decision, Policy, RouteRequest
from kubellm.routing import RoutingPolicy


class LeastLoadPolicy(Policy):
    name = RoutingPolicy.LEAST_LOAD

    def choose(self, request: RouteRequest, candidates: Sequence[Candidate]) -> Decision:
        return Decision(self._least_loaded(candidates).key, "least_load")
