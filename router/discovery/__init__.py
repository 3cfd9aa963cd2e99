"""Where backends come from: a static list, or a Kubernetes Service's EndpointSlices."""

from __future__ import annotations

from typing import Protocol

import aiohttp

from kubellm.router.backends import BackendRegistry
from kubellm.router.config import RouterConfig


class Discovery(Protocol):
    async def start(self) -> None:
        """Populate the registry once (before the router takes traffic)."""

    async def run(self) -> None:
        """Keep the registry current until cancelled."""


def make_discovery(config: RouterConfig, registry: BackendRegistry, session: aiohttp.ClientSession) -> Discovery:
    if config.discovery == "kubernetes":
        from kubellm.router.discovery.kubernetes import KubernetesDiscovery

        return KubernetesDiscovery.from_config(config, registry)
    if config.discovery != "static":
        raise ValueError(f"unknown discovery {config.discovery!r}; choose static or kubernetes")
    from kubellm.router.discovery.static import StaticDiscovery

    return StaticDiscovery(config.backends, registry)
