"""Routing policy names shared by the router's CLI and the operator's CRD (the operator imports no router code)."""

from __future__ import annotations

from enum import StrEnum


class RoutingPolicy(StrEnum):
    """How the router picks a replica; `prefix` is the default."""

    ROUND_ROBIN = "round_robin"
    LEAST_LOAD = "least_load"
    SESSION = "session"
    PREFIX = "prefix"


DEFAULT_ROUTING_POLICY = RoutingPolicy.PREFIX
DEFAULT_BALANCE_FACTOR = 1.25
DEFAULT_LOAD_FLOOR = 16  # in-flight requests a replica may hold before bounded loads bind (docs/router.md)
# A cached prefix earns a request's affinity only when it is worth more than the imbalance it causes: at least
# this fraction of the prompt's full blocks (sglang-router's cache_threshold default) and at least this many
# tokens (longer than the chat-template head every prompt shares). Shorter matches route as no match.
DEFAULT_PREFIX_MIN_MATCH_RATIO = 0.3
DEFAULT_PREFIX_MIN_MATCH_TOKENS = 64
