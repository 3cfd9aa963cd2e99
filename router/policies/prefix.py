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
from collections.abc import Callable, Sequence
from typing import Protocol

from kubellm.router.policies.base import Candidate, Decision, Policy, RouteRequest, Row
from kubellm.routing import (
    DEFAULT_BALANCE_FACTOR,
    DEFAULT_PREFIX_MIN_MATCH_RATIO,
    DEFAULT_PREFIX_MIN_MATCH_TOKENS,
    RoutingPolicy,
)


class Loaded(Protocol):
    """What choose_index reads of a replica (a router Backend, a Candidate)."""

    in_flight: int
    answering: int
    waiting: int


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

    def _cap(self, total: int, n: int) -> int:
        """The load bound: in-flight requests a replica may hold (with `total` the replicas' in-flight sum plus one)."""
        return max(1, self.load_floor, math.ceil(self.balance_factor * total / n))

    def choose_index(
        self,
        request: RouteRequest,
        loads: Sequence[Loaded],
        matches: Sequence[int],
        footprint: Callable[[int], int],
    ) -> tuple[int, str]:
        """choose_row's pick, as an index into `loads`/`matches`, without a row per replica: the router's hot path
        (every replica of every request) hands over its backends as they are (their in_flight, answering and waiting
        are read in place), the matches as `match_all` gave them, and footprints as a lookup by index, called only
        where the rule reads one (no replica holds an earned match). For replicas without an engine load line (the
        router takes the general row path otherwise); tests pin it to choose_row's pick, reason and tie rotation."""
        n = len(matches)
        need = self._need.get((request.num_blocks, request.block_tokens))
        if need is None:
            need = self.min_match_blocks(request)
        best = max(matches)
        if n == 1:
            return 0, "prefix_hit" if best >= need else "short_match" if best else "no_match"
        total = 1
        most = 0  # the largest in-flight count
        for x in loads:
            f = x.in_flight
            total += f
            if f > most:
                most = f
        cap = self._cap(total, n)
        best_earned = best if best >= need else 0
        if best_earned:
            holders = matches.count(best)
            if holders == 1:
                # one replica holds the longest earned match: when it may take the request it is the pick whatever
                # the rotation (the usual case of a routed request while loads are even)
                i = matches.index(best)
                x = loads[i]
                if x.in_flight < cap or x.answering >= x.in_flight:
                    self._turn += 1
                    return i, "prefix_hit"
            elif most < cap:
                # every replica may take it and several hold the longest earned match: the least loaded of those,
                # first in the rotated order; the holders found with list.index (C), no pass over the others
                self._turn += 1
                start = self._turn % n
                pick = pick_load = pick_rank = -1
                i = -1
                for _ in range(holders):
                    i = matches.index(best, i + 1)
                    x = loads[i]
                    load = x.in_flight + x.waiting
                    rank = i - start if i >= start else i - start + n
                    if pick < 0 or load < pick_load or (load == pick_load and rank < pick_rank):
                        pick, pick_load, pick_rank = i, load, rank
                return pick, "prefix_hit"
        # within the load bound (the least loaded, first of them, when none is)
        eligible = [i for i, x in enumerate(loads) if x.in_flight < cap or x.answering >= x.in_flight]
        if not eligible:
            low = min(x.in_flight for x in loads)
            eligible = [next(i for i, x in enumerate(loads) if x.in_flight == low)]
        self._turn += 1
        k = len(eligible)
        start = self._turn % k
        # the preference (-earned, footprint if nothing earned, load), first in the rotated order on ties
        p = eligible[start]
        m = matches[p]
        pick_m = m if m >= need else 0
        pick_fp = -1  # (read only where compared: no earned match on either side)
        x = loads[p]
        pick_load = x.in_flight + x.waiting
        for j in range(start + 1, start + k):
            i = eligible[j - k if j >= k else j]
            m = matches[i]
            earned = m if m >= need else 0
            if earned < pick_m:
                continue
            x = loads[i]
            load = x.in_flight + x.waiting
            if earned == pick_m:
                if not earned:
                    if pick_fp < 0:
                        pick_fp = footprint(p)
                    fp = footprint(i)
                    if fp > pick_fp or (fp == pick_fp and load >= pick_load):
                        continue
                    p, pick_fp, pick_load = i, fp, load
                    continue
                if load >= pick_load:
                    continue
            p, pick_m, pick_load = i, earned, load
            pick_fp = -1
        if pick_m < best_earned:
            reason = "load_spill"
        elif pick_m:
            reason = "prefix_hit"
        elif best:
            reason = "short_match"  # some replica holds the prompt's head, too little of it to be worth following
        else:
            reason = "no_match"
        return p, reason

    def choose(self, request: RouteRequest, candidates: Sequence[Candidate]) -> Decision:
        rows = [(c.key, c.in_flight, c.answering, c.waiting, c.matched_blocks, c.footprint, None) for c in candidates]
        row, reason, matched = self.choose_row(request, rows)
        return Decision(row[0], reason, matched)

    def choose_row(self, request: RouteRequest, rows: Sequence[Row]) -> tuple[Row, str, int]:
        """The rule in the module's docstring, in two passes over the candidates (it runs once per routed request,
        for every replica: the load bound, the best earned match anywhere and whether any replica holds some of
        the prompt in the first pass; the preference among the eligible, in rotated order, in the second). Rows,
        not Candidates: the router builds one per replica per request (policies/base.py)."""
        key = (request.num_blocks, request.block_tokens)
        need = self._need.get(key)
        if need is None:
            need = self.min_match_blocks(request)
        n = len(rows)
        if n == 1:  # no choice to make: only the reason (what the general path below would say)
            r = rows[0]
            m = r[4]
            return r, "prefix_hit" if m >= need else "short_match" if m else "no_match", m
        total = 1
        best_anywhere = 0
        best_row = rows[0]
        best_count = 0  # replicas holding the best earned match
        held = False  # some replica holds at least one of the prompt's blocks
        for r in rows:
            total += r[1]
            m = r[4]
            if m:
                held = True
                if m >= need:
                    if m > best_anywhere:
                        best_anywhere, best_row, best_count = m, r, 1
                    elif m == best_anywhere:
                        best_count += 1
        # within_bound(): a replica may take one more request while it stays within the cap, or while every request
        # it holds is answering; the least loaded always may
        cap = self._cap(total, n)
        if best_count == 1 and (best_row[1] < cap or best_row[2] >= best_row[1]):
            # one replica holds the longest earned match and may take the request: the preference below ranks it
            # first whatever the rotation (the common case of a routed request: its prompt's holder; no second pass)
            self._turn += 1
            return best_row, "prefix_hit", best_anywhere
        eligible = [r for r in rows if r[1] < cap or r[2] >= r[1]]
        if not eligible:
            eligible = [min(rows, key=_row_in_flight)]
        # min(self._rotated(eligible), key=preference): longest earned match first; with none, the smallest
        # footprint; then the least loaded; ties to the first in the rotated order
        self._turn += 1
        k = len(eligible)
        start = self._turn % k
        # (the preference (-earned, footprint if nothing earned, load) compared field by field: no tuple per row)
        pick = eligible[start]
        m = pick[4]
        pick_m = m if m >= need else 0
        pick_fp = 0 if pick_m else pick[5]
        pick_load = pick[1] + pick[3]
        for i in range(start + 1, start + k):
            r = eligible[i - k if i >= k else i]
            m = r[4]
            earned = m if m >= need else 0
            if earned < pick_m:
                continue
            load = r[1] + r[3]
            if earned == pick_m:
                fp = 0 if earned else r[5]
                if fp > pick_fp or (fp == pick_fp and load >= pick_load):
                    continue
            pick, pick_m, pick_fp, pick_load = r, earned, 0 if earned else r[5], load
        if pick_m < best_anywhere:
            reason = "load_spill"
        elif pick_m:
            reason = "prefix_hit"
        elif held:
            reason = "short_match"  # some replica holds the prompt's head, too little of it to be worth following
        else:
            reason = "no_match"
        return pick, reason, pick[4]


def _row_in_flight(r: Row) -> int:
    return r[1]
