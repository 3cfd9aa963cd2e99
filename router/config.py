"""The router's settings, one dataclass filled by the CLI (or by tests directly)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kubellm.router.prefix_index import DEFAULT_APPROX_SIZE
from kubellm.routing import (
    DEFAULT_BALANCE_FACTOR,
    DEFAULT_LOAD_FLOOR,
    DEFAULT_PREFIX_MIN_MATCH_RATIO,
    DEFAULT_PREFIX_MIN_MATCH_TOKENS,
    DEFAULT_ROUTING_POLICY,
    RoutingPolicy,
)


@dataclass
class RouterConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    models: list[str] = field(default_factory=list)  # served even with zero replicas (scale from zero)
    backends: list[str] = field(default_factory=list)  # static discovery: URL or MODEL=URL
    discovery: str = "static"  # static | kubernetes
    namespace: str | None = None
    service: str | None = None
    selector: dict[str, str] = field(default_factory=dict)
    kube_api: str | None = None  # API server URL outside a cluster (tests); in-cluster config otherwise
    kube_token_file: str | None = None
    endpoint_port_name: str | None = None  # EndpointSlice port name; the first port when unset
    policy: RoutingPolicy = DEFAULT_ROUTING_POLICY
    balance_factor: float = DEFAULT_BALANCE_FACTOR
    load_floor: int = DEFAULT_LOAD_FLOOR  # bounded loads bind only above this many in-flight requests
    # a cached prefix earns affinity only when it covers this fraction of the prompt and this many tokens
    prefix_min_match_ratio: float = DEFAULT_PREFIX_MIN_MATCH_RATIO
    prefix_min_match_tokens: int = DEFAULT_PREFIX_MIN_MATCH_TOKENS
    api_keys: list[str] = field(default_factory=list)
    upstream_api_key: str | None = None
    relist_period: float = 30.0
    health_interval: float = 2.0
    health_timeout: float = 1.0
    unhealthy_threshold: int = 2
    breaker_threshold: int = 5
    breaker_cooldown: float = 5.0
    queue_timeout: float = 30.0
    queue_size: int = 1024
    max_inflight_per_backend: int = 0  # 0 = unbounded; above it a replica counts as saturated
    max_body_bytes: int = 16 * 1024 * 1024
    max_header_bytes: int = 16 * 1024
    max_retries: int = 2
    retry_backoff: float = 0.02
    connect_timeout: float = 3.0
    request_timeout: float = 600.0  # upstream silence (socket read) before the request fails
    kv_events: bool = True
    approx_index_size: int = DEFAULT_APPROX_SIZE
    session_header: str = "x-session-id"
    debug_headers: bool = False  # add X-Kubellm-Backend / X-Kubellm-Route to responses
    log_level: str = "info"
