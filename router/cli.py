"""`kubellm router`: the prefix-cache-aware OpenAI-compatible router."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from kubellm.routing import (
    DEFAULT_BALANCE_FACTOR,
    DEFAULT_LOAD_FLOOR,
    DEFAULT_PREFIX_MIN_MATCH_RATIO,
    DEFAULT_PREFIX_MIN_MATCH_TOKENS,
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


def _on_off(value: str) -> bool:
    if value.lower() in ("on", "true", "1", "yes"):
        return True
    if value.lower() in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kubellm router",
        description="OpenAI-compatible router over kubellm engine replicas, prefix-cache-aware under bounded load.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--model",
        action="append",
        default=[],
        dest="models",
        metavar="NAME",
        help="a model this router serves (repeatable); known even with zero replicas",
    )
    p.add_argument(
        "--backend",
        action="append",
        default=[],
        dest="backends",
        metavar="[MODEL=]URL",
        help="static backend (repeatable)",
    )
    p.add_argument(
        "--discovery",
        choices=["static", "kubernetes"],
        default=None,
        help="static (--backend) or kubernetes (EndpointSlices); default: kubernetes when --service or "
        "--selector is given, else static",
    )
    p.add_argument("--namespace", default=None, help="namespace of the EndpointSlices (default: the pod's)")
    p.add_argument("--service", default=None, help="Service whose EndpointSlices list the replicas")
    p.add_argument("--selector", type=_selector, default={}, help="extra EndpointSlice label selector k=v[,k=v]")
    p.add_argument("--endpoint-port-name", default=None, help="EndpointSlice port name (default: the first port)")
    p.add_argument("--kube-api", default=None, help="API server URL outside a cluster (in-cluster config otherwise)")
    p.add_argument("--kube-token-file", default=None)
    p.add_argument("--policy", type=RoutingPolicy, choices=list(RoutingPolicy), default=RoutingPolicy.PREFIX)
    p.add_argument(
        "--balance-factor",
        type=float,
        default=DEFAULT_BALANCE_FACTOR,
        help="bounded loads: no replica takes more than ceil(c × mean in-flight)",
    )
    p.add_argument(
        "--load-floor",
        type=int,
        default=DEFAULT_LOAD_FLOOR,
        help="bounded loads bind only once a replica has more than this many requests in flight",
    )
    p.add_argument(
        "--prefix-min-match-ratio",
        type=_fraction,
        default=DEFAULT_PREFIX_MIN_MATCH_RATIO,
        help="prefix policy: a cached prefix pulls a request to its replica only when it covers at least this "
        "fraction of the prompt's blocks; shorter matches are routed as no match (0: any match)",
    )
    p.add_argument(
        "--prefix-min-match-tokens",
        type=_non_negative_int,
        default=DEFAULT_PREFIX_MIN_MATCH_TOKENS,
        help="prefix policy: a cached prefix must also be at least this many tokens long to pull a request "
        "(longer than the chat-template head every prompt shares; 0: any length)",
    )
    p.add_argument(
        "--api-key",
        action="append",
        default=None,
        dest="api_keys",
        help="accepted client API key (repeatable; env KUBELLM_API_KEY, comma-separated)",
    )
    p.add_argument(
        "--upstream-api-key",
        default=os.environ.get("KUBELLM_UPSTREAM_API_KEY"),
        help="key the router sends to engines started with --api-key (env KUBELLM_UPSTREAM_API_KEY)",
    )
    p.add_argument("--relist-period", type=float, default=30.0, help="seconds between full EndpointSlice re-lists")
    p.add_argument("--health-interval", type=float, default=2.0, help="seconds between health probes")
    p.add_argument("--health-timeout", type=float, default=1.0)
    p.add_argument("--unhealthy-threshold", type=int, default=2, help="failed probes before ejection")
    p.add_argument("--breaker-threshold", type=int, default=5, help="consecutive failed requests that open the breaker")
    p.add_argument("--breaker-cooldown", type=float, default=5.0)
    p.add_argument(
        "--queue-timeout",
        type=float,
        default=30.0,
        help="seconds a request waits for a replica (scale from zero) before 503 + Retry-After",
    )
    p.add_argument("--queue-size", type=int, default=1024, help="requests that may wait at once")
    p.add_argument("--max-inflight-per-backend", type=int, default=0, help="0 = unbounded; above it a replica is full")
    p.add_argument("--max-body-bytes", type=int, default=16 * 1024 * 1024)
    p.add_argument("--max-header-bytes", type=int, default=16 * 1024)
    p.add_argument("--max-retries", type=int, default=2, help="retries on another replica before the first byte")
    p.add_argument("--connect-timeout", type=float, default=3.0)
    p.add_argument("--request-timeout", type=float, default=600.0, help="upstream silence before a request fails")
    p.add_argument(
        "--kv-events",
        type=_on_off,
        default=True,
        metavar="on|off",
        help="subscribe to replicas' KV events (precise prefix index)",
    )
    p.add_argument(
        "--approx-index-size",
        type=int,
        default=200_000,
        help="bound of the approximate prefix index in (replica, block) entries",
    )
    p.add_argument("--session-header", default="x-session-id", help="header carrying the session key (session policy)")
    p.add_argument("--debug-headers", action="store_true", help="add X-Kubellm-Backend/-Route to responses")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def config_from_args(argv: list[str]):  # -> RouterConfig (imported lazily: --help needs no aiohttp)
    from kubellm.router.config import RouterConfig

    a = build_parser().parse_args(argv)
    keys = a.api_keys or [k for k in os.environ.get("KUBELLM_API_KEY", "").split(",") if k.strip()]
    discovery = a.discovery or ("kubernetes" if a.service or a.selector else "static")
    return RouterConfig(
        host=a.host,
        port=a.port,
        models=a.models,
        backends=a.backends,
        discovery=discovery,
        namespace=a.namespace,
        service=a.service,
        selector=a.selector,
        kube_api=a.kube_api,
        kube_token_file=a.kube_token_file,
        endpoint_port_name=a.endpoint_port_name,
        policy=a.policy,
        balance_factor=a.balance_factor,
        load_floor=a.load_floor,
        prefix_min_match_ratio=a.prefix_min_match_ratio,
        prefix_min_match_tokens=a.prefix_min_match_tokens,
        api_keys=[k.strip() for k in keys],
        upstream_api_key=a.upstream_api_key,
        relist_period=a.relist_period,
        health_interval=a.health_interval,
        health_timeout=a.health_timeout,
        unhealthy_threshold=a.unhealthy_threshold,
        breaker_threshold=a.breaker_threshold,
        breaker_cooldown=a.breaker_cooldown,
        queue_timeout=a.queue_timeout,
        queue_size=a.queue_size,
        max_inflight_per_backend=a.max_inflight_per_backend,
        max_body_bytes=a.max_body_bytes,
        max_header_bytes=a.max_header_bytes,
        max_retries=a.max_retries,
        connect_timeout=a.connect_timeout,
        request_timeout=a.request_timeout,
        kv_events=a.kv_events,
        approx_index_size=a.approx_index_size,
        session_header=a.session_header.lower(),
        debug_headers=a.debug_headers,
        log_level=a.log_level,
    )


async def serve(config) -> None:
    from kubellm.router.app import RouterServer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    async with RouterServer(config) as server:
        logging.getLogger("kubellm.router").info(
            "router on %s: policy=%s discovery=%s backends=%d models=%s",
            server.url,
            config.policy.value,
            config.discovery,
            len(server.router.registry.backends),
            ",".join(config.models) or "(learned)",
        )
        print(f"kubellm router listening on {server.url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config = config_from_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if config.discovery == "static" and not config.backends and not config.models:
        print("kubellm router: give --backend URL (static) or --service NAME (kubernetes)", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from kubellm.router.app import ListenError

    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(serve(config))
    except KeyboardInterrupt:
        pass
    except ListenError as e:  # a port in use is a user's everyday mistake: one line, no traceback
        print(f"kubellm router: {e}", file=sys.stderr)
        return 1
    return 0
