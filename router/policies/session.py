"""Session affinity: rendezvous hashing of a session key, under bounded loads.

Rendezvous (highest random weight) hashing moves only the sessions of a replica that leaves, and the
bounded-load rule sends a session elsewhere only while its home replica is above c × mean in-flight.
"""

from __future__ import annotations

from collections.abc import Sequence

import xxhash

from kubellm.router.policies.base import Candidate, Decision, Policy, RouteRequest, within_bound
from kubellm.routing import DEFAULT_BALANCE_FACTOR, RoutingPolicy


def rendezvous_weight(session_key: str, backend_key: str) -> int:
    return xxhash.xxh3_64_intdigest(f"{session_key}\x00{backend_key}".encode())


class SessionPolicy(Policy):
    name = RoutingPolicy.SESSION

    def __init__(self, balance_factor: float = DEFAULT_BALANCE_FACTOR, load_floor: int = 0) -> None:
        super().__init__()
        self.balance_factor = balance_factor
        self.load_floor = load_floor

    def choose(self, request: RouteRequest, candidates: Sequence[Candidate]) -> Decision:
        if not request.session_key:
            return Decision(self._least_loaded(candidates).key, "no_session")
        key = request.session_key
        home = max(candidates, key=lambda c: rendezvous_weight(key, c.key))
        eligible = within_bound(candidates, self.balance_factor, self.load_floor)
        pick = max(eligible, key=lambda c: rendezvous_weight(key, c.key))
        return Decision(pick.key, "session" if pick.key == home.key else "load_spill")
