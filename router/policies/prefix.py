"""Prefix-cache-aware routing under bounded loads.

Score = matched leading prompt blocks (from the replica's KV events, or the router's own record of what it
sent where). Among the replicas that stay within ceil(c × mean in-flight) after taking the request, the one
with the longest match wins; ties go to the least loaded. A hot prefix therefore spills to other replicas
once its holder is c × the mean, instead of melting it.

A match earns affinity only when it is worth more than the imbalance it causes: at least `min_match_ratio` of
the prompt's full blocks and at least `min_match_tokens` tokens (sglang-router's cache_threshold is the ratio
alone). A shorter one — typically the chat template's head, the system/role tokens every prompt starts with —
saves a few milliseconds of prefill on whichever replica holds it, yet would pull every unrelated prompt
towards that replica; it counts as no match (reason `short_match`).

A prompt that no eligible replica holds enough of starts a new working set (a new tenant's system prompt, a new
document): it goes to the replica with the smallest footprint, the fewest distinct blocks the router has
placed there, so working sets spread evenly over the fleet's KV caches and none of them evicts what its
tenants will ask for again (sglang-router's cache_aware does the same with its smallest tree).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from kubellm.router.policies.base import Candidate, Decision, Policy, RouteRequest
from kubellm.routing import (
    DEFAULT_BALANCE_FACTOR,
    DEFAULT_PREFIX_MIN_MATCH_RATIO,
    DEFAULT_PREFIX_MIN_MATCH_TOKENS,
    RoutingPolicy,
)


class PrefixPolicy(Policy):
    name = RoutingPolicy.PREFIX

    def __init__(
        self,
        balance_factor: float = DEFAULT_BALANCE_FACTOR,
        load_floor: int = 0,
        min_match_ratio: float = DEFAULT_PREFIX_MIN_MATCH_RATIO,
        min_match_tokens: int = DEFAULT_PREFIX_MIN_MATCH_TOKENS,
    ) -> None:
        super().__init__()
        self.balance_factor = balance_factor
        self.load_floor = load_floor
        self.min_match_ratio = min_match_ratio
        self.min_match_tokens = min_match_tokens
        self._need: dict[tuple[int, int], int] = {}  # min_match_blocks by (prompt blocks, tokens per block)

    def min_match_blocks(self, request: RouteRequest) -> int:
        """The fewest leading blocks a replica must hold for this prompt to follow it (never less than one)."""
        key = (request.num_blocks, request.block_tokens)
        need = self._need.get(key)
        if need is None:  # (a few distinct prompt lengths and block sizes: computed once each, bounded)
            by_tokens = -(-self.min_match_tokens // max(1, request.block_tokens))
            by_ratio = math.ceil(self.min_match_ratio * request.num_blocks - 1e-9)
            need = max(1, by_tokens, by_ratio)
            if len(self._need) >= 4096:
                self._need.clear()
            self._need[key] = need
        return need

    def choose(self, request: RouteRequest, candidates: Sequence[Candidate]) -> Decision:
        """The rule in the module's docstring, in two passes over the candidates (it runs once per routed request,
        for every replica: the load bound, the best earned match anywhere and whether any replica holds some of
        the prompt in the first pass; the preference among the eligible, in rotated order, in the second)."""
        need = self.min_match_blocks(request)
        n = len(candidates)
        if n == 1:  # no choice to make: only the reason (what the general path below would say)
            m = candidates[0].matched_blocks
            return Decision(candidates[0].key, "prefix_hit" if m >= need else "short_match" if m else "no_match", m)
        total = 1
        best_anywhere = 0
        held = False  # some replica holds at least one of the prompt's blocks
        for c in candidates:
            total += c.in_flight
            m = c.matched_blocks
            if m:
                held = True
                if m >= need and m > best_anywhere:
                    best_anywhere = m
        # within_bound(): a replica may take one more request while it stays within the cap, or while every request
        # it holds is answering; the least loaded always may
        cap = max(1, self.load_floor, math.ceil(self.balance_factor * total / n))
        eligible = [c for c in candidates if c.in_flight < cap or c.answering >= c.in_flight]
        if not eligible:
            eligible = [min(candidates, key=_in_flight)]
        # min(self._rotated(eligible), key=preference): longest earned match first; with none, the smallest
        # footprint; then the least loaded; ties to the first in the rotated order
        self._turn += 1
        k = len(eligible)
        start = self._turn % k
        pick = eligible[start]
        m = pick.matched_blocks
        pick_m = m if m >= need else 0
        pick_key = (-pick_m, 0 if pick_m else pick.footprint, pick.in_flight + pick.waiting)
        for i in range(start + 1, start + k):
            c = eligible[i - k if i >= k else i]
            m = c.matched_blocks
            earned = m if m >= need else 0
            key = (-earned, 0 if earned else c.footprint, c.in_flight + c.waiting)
            if key < pick_key:
                pick, pick_m, pick_key = c, earned, key
        if pick_m < best_anywhere:
            reason = "load_spill"
        elif pick_m:
            reason = "prefix_hit"
        elif held:
            reason = "short_match"  # some replica holds the prompt's head, too little of it to be worth following
        else:
            reason = "no_match"
        return Decision(pick.key, reason, pick.matched_blocks)


def _in_flight(c: Candidate) -> int:
    return c.in_flight
