"""Routing policies: pure functions of (request, candidates) -> decision."""

from __future__ import annotations

from kubellm.router.policies.base import Candidate, Decision, Policy, RouteRequest, load_cap, within_bound
from kubellm.router.policies.least_load import LeastLoadPolicy
from kubellm.router.policies.prefix import PrefixPolicy
from kubellm.router.policies.round_robin import RoundRobinPolicy
from kubellm.router.policies.session import SessionPolicy
from kubellm.routing import (
    DEFAULT_BALANCE_FACTOR,
    DEFAULT_PREFIX_MIN_MATCH_RATIO,
    DEFAULT_PREFIX_MIN_MATCH_TOKENS,
    RoutingPolicy,
)

__all__ = [
    "Candidate",
    "Decision",
    "LeastLoadPolicy",
    "Policy",
    "PrefixPolicy",
    "RoundRobinPolicy",
    "RouteRequest",
    "SessionPolicy",
    "load_cap",
    "make_policy",
    "within_bound",
]


def make_policy(
    policy: RoutingPolicy | str,
    balance_factor: float = DEFAULT_BALANCE_FACTOR,
    load_floor: int = 0,
    prefix_min_match_ratio: float = DEFAULT_PREFIX_MIN_MATCH_RATIO,
    prefix_min_match_tokens: int = DEFAULT_PREFIX_MIN_MATCH_TOKENS,
) -> Policy:
    policy = RoutingPolicy(policy)
    if policy is RoutingPolicy.ROUND_ROBIN:
        return RoundRobinPolicy()
    if policy is RoutingPolicy.LEAST_LOAD:
        return LeastLoadPolicy()
    if policy is RoutingPolicy.SESSION:
        return SessionPolicy(balance_factor, load_floor)
    return PrefixPolicy(balance_factor, load_floor, prefix_min_match_ratio, prefix_min_match_tokens)
