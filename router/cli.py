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
    except ConfigFileError as e:  # a KUBELLM_* variable behind a flag's default
        print(f"kubellm router: error: {e}", file=sys.stderr)
        return 2
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
