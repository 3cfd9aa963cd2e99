"""The router's settings, one dataclass filled by the CLI (or by tests directly); `kubellm router` has one
flag per field, generated from this class (kubellm/config_flags.py)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from kubellm.config_flags import option
from kubellm.router.prefix_index import DEFAULT_APPROX_SIZE
from kubellm.router.tokenization import TEXT_BLOCK_CHARS
from kubellm.router.workers import default_workers
from kubellm.routing import (
    DEFAULT_BALANCE_FACTOR,
    DEFAULT_LOAD_FLOOR,
    DEFAULT_PREFIX_MIN_MATCH_RATIO,
    DEFAULT_PREFIX_MIN_MATCH_TOKENS,
    DEFAULT_ROUTING_POLICY,
    RoutingPolicy,
)


def _selector(value: str) -> dict[str, str]:
    out = {}
    for part in value.split(","):
        if not part.strip():
            continue
        k, sep, v = part.partition("=")
        if not sep or not k.strip():
            raise argparse.ArgumentTypeError(f"selector must be key=value[,key=value]: {value!r}")
        out[k.strip()] = v.strip()
    return out


def _fraction(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        x = float("nan")
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction from 0 to 1, got {value!r}")
    return x


def _non_negative_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value!r}")
    return n


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")
    return n


def _positive_seconds(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        x = 0.0
    if not 0 < x < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {value!r}")
    return x


def _on_off(value: str) -> bool:
    if value.lower() in ("on", "true", "1", "yes"):
        return True
    if value.lower() in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {value!r}")


def _api_keys_from_env() -> list[str]:
    return [k.strip() for k in os.environ.get("KUBELLM_API_KEY", "").split(",") if k.strip()]


@dataclass
class RouterConfig:
    host: str = option("0.0.0.0", help="bind address")
    workers: int = option(
        default_factory=default_workers,
        parse=_positive_int,
        help="router processes sharing the port (SO_REUSEPORT), each with its own KV-event subscriptions and "
        "index (default: the CPUs the process may use: its cgroup CPU limit, else its affinity mask)",
    )
    port: int = option(8080, help="port")
    models: list[str] = option(
        default_factory=list,
        flag="--model",
        repeat=True,
        metavar="NAME",
        help="a model this router serves (repeatable); known even with zero replicas (scale from zero)",
    )
    backends: list[str] = option(
        default_factory=list, flag="--backend", repeat=True, metavar="[MODEL=]URL", help="static backend (repeatable)"
    )
    discovery: str | None = option(
        None,
        choices=("static", "kubernetes"),
        help="static (--backend) or kubernetes (EndpointSlices); unset: kubernetes when --service or --selector "
        "is given, else static",
    )
    namespace: str | None = option(None, help="namespace of the EndpointSlices (unset: the pod's)")
    service: str | None = option(None, help="Service whose EndpointSlices list the replicas")
    selector: dict[str, str] = option(
        default_factory=dict, parse=_selector, metavar="K=V[,K=V]", help="extra EndpointSlice label selector"
    )
    kube_api: str | None = option(None, help="API server URL outside a cluster (in-cluster config otherwise)")
    kube_token_file: str | None = option(None, help="bearer token file for --kube-api")
    endpoint_port_name: str | None = option(None, help="EndpointSlice port name (unset: the first port)")
    policy: RoutingPolicy = option(DEFAULT_ROUTING_POLICY, choices=list(RoutingPolicy), help="routing policy")
    balance_factor: float = option(
        DEFAULT_BALANCE_FACTOR, help="bounded loads: no replica takes more than ceil(c x mean in-flight)"
    )
    load_floor: int = option(
        DEFAULT_LOAD_FLOOR, help="bounded loads bind only once a replica has more than this many requests in flight"
    )
    prefix_min_match_ratio: float = option(
        DEFAULT_PREFIX_MIN_MATCH_RATIO,
        parse=_fraction,
        help="prefix policy: a cached prefix pulls a request to its replica only when it covers at least this "
        "fraction of the prompt's blocks; shorter matches are routed as no match (0: any match)",
    )
    prefix_min_match_tokens: int = option(
        DEFAULT_PREFIX_MIN_MATCH_TOKENS,
        parse=_non_negative_int,
        help="prefix policy: a cached prefix must also be at least this many tokens long to pull a request "
        "(longer than the chat-template head every prompt shares; 0: any length)",
    )
    api_keys: list[str] = option(
        default_factory=_api_keys_from_env,
        flag="--api-key",
        repeat=True,
        env="KUBELLM_API_KEY",
        help="accepted client API key (repeatable; the variable: comma-separated)",
    )
    upstream_api_key: str | None = option(
        default_factory=lambda: os.environ.get("KUBELLM_UPSTREAM_API_KEY") or None,
        env="KUBELLM_UPSTREAM_API_KEY",
        help="key the router sends to engines started with --api-key",
    )
    relist_period: float = option(30.0, help="seconds between full EndpointSlice re-lists")
    health_interval: float = option(2.0, help="seconds between health probes")
    health_timeout: float = option(1.0, help="seconds a health probe may take")
    unhealthy_threshold: int = option(2, help="failed probes before ejection")
    breaker_threshold: int = option(5, help="consecutive failed requests that open a replica's breaker")
    breaker_cooldown: float = option(5.0, help="seconds an open breaker waits before a trial request")
    queue_timeout: float = option(
        30.0, help="seconds a request waits for a replica (scale from zero) before 503 + Retry-After"
    )
    queue_size: int = option(1024, help="requests that may wait at once")
    max_inflight_per_backend: int = option(0, help="above this a replica counts as saturated (0: unbounded)")
    max_body_bytes: int = option(16 * 1024 * 1024, help="larger request bodies get 413")
    max_header_bytes: int = option(
        16 * 1024, help="a longer request line or header field is refused (431); all headers together: 4x (>= 64 KiB)"
    )
    client_timeout: float = option(
        60.0,
        parse=_positive_seconds,
        help="seconds a client may take to send a whole request from its first byte (a total deadline, extended "
        "by 1 s per 64 KiB of body received so a large upload at a steady pace is not cut; then 408), "
        "and to take any of its answer before it is cut off",
    )
    max_retries: int = option(2, help="retries on another replica before the first byte")
    retry_backoff: float = option(0.02, help="seconds before the first retry (doubling after)")
    connect_timeout: float = option(3.0, help="seconds to connect to a replica")
    request_timeout: float = option(600.0, help="upstream silence (socket read) in seconds before a request fails")
    kv_events: bool = option(
        True, parse=_on_off, metavar="on|off", help="subscribe to replicas' KV events (precise prefix index)"
    )
    warmup_timeout: float = option(
        2.0,
        help="seconds a starting router may hold requests (and answer 503 on /health) while the replicas' KV-event "
        "snapshots and the tokenizer arrive (a restarted router then routes on a warm index)",
    )
    approx_index_size: int = option(
        DEFAULT_APPROX_SIZE, help="bound of the approximate prefix index in (replica, block) entries"
    )
    text_block_chars: int = option(
        TEXT_BLOCK_CHARS,
        parse=_positive_int,
        help="bytes of prompt text per block of the router's own approximate key, used until a replica's tokenizer "
        "is known (or with --tokenizer off); smaller finds shared heads more finely, at more CPU per request",
    )
    tokenizer: bool = option(
        True,
        parse=_on_off,
        metavar="on|off",
        help="fetch the replicas' tokenizer (GET /v1/tokenizer_info) and route on the engine's token-block hashes; "
        "off: route on text blocks only",
    )
    session_header: str = option("x-session-id", help="header carrying the session key (session policy)")
    debug_headers: bool = option(False, help="add X-Kubellm-Backend / X-Kubellm-Route to responses")
    log_level: str = option("info", choices=("debug", "info", "warning", "error"), help="log level")

    def __post_init__(self) -> None:
        if self.discovery is None:
            self.discovery = "kubernetes" if self.service or self.selector else "static"
        self.session_header = self.session_header.lower()
