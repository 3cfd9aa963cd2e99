"""`kubellm router`: the prefix-cache-aware OpenAI-compatible router."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from dataclasses import fields

from kubellm.config_flags import ConfigFileError, add_flags, values


def build_parser() -> argparse.ArgumentParser:
    """One flag per RouterConfig field (router/config.py; imports no aiohttp, so --help stays light)."""
    from kubellm.router.config import RouterConfig

    p = argparse.ArgumentParser(
        prog="kubellm router",
        description="OpenAI-compatible router over kubellm engine replicas, prefix-cache-aware under bounded load.",
    )
    add_flags(p, RouterConfig)
    return p


def config_from_args(argv: list[str]):  # -> RouterConfig
    from kubellm.router.config import RouterConfig

    ns = build_parser().parse_args(argv)
    return RouterConfig(**values(ns, RouterConfig, [f.name for f in fields(RouterConfig)]))


async def serve(config, worker=None, on_ready=None) -> None:
    from kubellm.router.app import RouterServer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    async with RouterServer(config, worker) as server:
        _settle_gc()
        if on_ready is not None:  # a worker: the parent announces the router once all are up
            on_ready()
            await stop.wait()
            return
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


def _settle_gc() -> None:
    """Once the router is up: move what start-up built (modules, the tokenizer, the config) out of the collector's
    reach, and collect the young generation less often. A routed request allocates a few hundred short-lived
    containers; with the default thresholds the collector ran every few requests and re-walked long-lived objects
    (bench/router.py overhead: ~8% of the router's CPU per request on one core)."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config = config_from_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    except ConfigFileError as e:  # a KUBELLM_* variable behind a flag's default
        print(f"kubellm router: error: {e}", file=sys.stderr)
        return 2
    if config.discovery == "static" and not config.backends and not config.models:
        print("kubellm router: give --backend URL (static) or --service NAME (kubernetes)", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from kubellm.router.app import ListenError

    if config.workers > 1:
        return _run_workers(config)
    try:
        _event_loop_runner()(serve(config))
    except KeyboardInterrupt:
        pass
    except ListenError as e:  # a port in use is a user's everyday mistake: one line, no traceback
        print(f"kubellm router: {e}", file=sys.stderr)
        return 1
    return 0


def _event_loop_runner():
    try:
        import uvloop

        return uvloop.run
    except ImportError:
        return asyncio.run


def _run_workers(config) -> int:
    """The parent of `--workers N`: holds the port, starts the workers, restarts any that die."""
    import os

    import kubellm.router.app  # noqa: F401  (imported once here, so forked workers start at once)
    from kubellm.router.workers import Supervisor, hold_port, worker_config

    try:
        holder = hold_port(config.host, config.port)
    except OSError as e:
        print(
            f"kubellm router: cannot listen on {config.host}:{config.port} "
            f"({os.strerror(e.errno) if e.errno else e}); choose another port with --port",
            file=sys.stderr,
        )
        return 1
    port = holder.getsockname()[1]
    host = "127.0.0.1" if config.host in ("0.0.0.0", "") else config.host
    supervisor = Supervisor(worker_config(config, port), config.workers, _worker_main)
    log = logging.getLogger("kubellm.router")

    def announce() -> None:
        log.info("router on http://%s:%d: %d workers, policy=%s", host, port, config.workers, config.policy.value)
        print(f"kubellm router listening on http://{host}:{port} ({config.workers} workers)", flush=True)

    try:
        return supervisor.run(announce)
    finally:
        holder.close()


def _worker_main(config, index: int, metrics_dir: str, ready) -> None:
    """One worker process (forked by the Supervisor)."""
    import os

    from kubellm.parent_watch import die_with_parent
    from kubellm.router.workers import WorkerPlacement

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)  # serve() installs the loop's own handlers
    die_with_parent(os.getppid(), signal.SIGTERM, exit_after_s=10)  # never outlive the supervisor (it holds the port)
    try:
        _event_loop_runner()(serve(config, WorkerPlacement(index, metrics_dir), ready.set))
    except KeyboardInterrupt:
        pass
