"""Prefix-cache-aware routing under bounded loads.

Score = matched leading prompt blocks (from the replica's KV events, or the router's own record of what it
sent where). Among the replicas that stay within ceil(c × mean in-flight) after taking the request, the one
with the longest match wins; ties go to the least loaded. A hot prefix therefore spills to other replicas
once its holder is c × the mean, instead of melting it.

A prompt that no eligible replica holds any of starts a new working set (a new tenant's system prompt, a new
document): it goes to the replica with the smallest footprint, the fewest distinct blocks the router has
placed there, so working sets spread evenly over the fleet's KV caches and none of them evicts what its
tenants will ask for again (sglang-router's cache_aware does the same with its smallest tree).
"""

from __future__ import annotations

from collections.abc import Sequence

from kubellm.router.policies.base import Candidate, Decision, Policy, RouteRequest, within_bound
from kubellm.routing import DEFAULT_BALANCE_FACTOR, RoutingPolicy


class PrefixPolicy(Policy):
    name = RoutingPolicy.PREFIX

    def __init__(self, balance_factor: float = DEFAULT_BALANCE_FACTOR, load_floor: int = 0) -> None:
        super().__init__()
        self.balance_factor = balance_factor
        self.load_floor = load_floor

    def choose(self, request: RouteRequest, candidates: Sequence[Candidate]) -> Decision:
        best_anywhere = max(c.matched_blocks for c in candidates)
        eligible = within_bound(candidates, self.balance_factor, self.load_floor)
        pick = min(self._rotated(eligible), key=_preference)
        if pick.matched_blocks < best_anywhere:
            reason = "load_spill"
        elif pick.matched_blocks == 0:
            reason = "no_match"
        else:
            reason = "prefix_hit"
        return Decision(pick.key, reason, pick.matched_blocks)


def _preference(c: Candidate) -> tuple[int, int, int]:
    """Longest match first; with nothing matched, the smallest footprint; then the least loaded."""
    return (-c.matched_blocks, 0 if c.matched_blocks else c.footprint, c.in_flight + c.waiting)
