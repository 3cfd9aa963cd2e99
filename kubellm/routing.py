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
