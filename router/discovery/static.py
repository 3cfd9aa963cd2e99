"""Static discovery: `--backend URL` or `--backend MODEL=URL`, fixed for the router's life.
Health probes still eject and re-admit them."""

from __future__ import annotations

import asyncio

from kubellm.router.backends import BackendRegistry, EndpointInfo


def parse_backend(spec: str) -> EndpointInfo:
    spec = spec.strip()
    model = None
    if "=" in spec and "://" not in spec.split("=", 1)[0]:
        model, spec = spec.split("=", 1)
    url = spec if "://" in spec else f"http://{spec}"
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"backend URL must be http(s): {spec!r}")
    return EndpointInfo(url=url.rstrip("/"), models=frozenset([model]) if model else None)


class StaticDiscovery:
    def __init__(self, specs: list[str], registry: BackendRegistry):
        self.endpoints = [parse_backend(s) for s in specs]
        merged: dict[str, EndpointInfo] = {}
        for e in self.endpoints:  # the same URL pinned to several models serves all of them
            prev = merged.get(e.url)
            if prev is not None and prev.models is not None and e.models is not None:
                e = EndpointInfo(e.url, models=prev.models | e.models)
            merged[e.url] = e
        self.endpoints = list(merged.values())
        self.registry = registry

    async def start(self) -> None:
        self.registry.set_endpoints(self.endpoints)

    async def run(self) -> None:
        await asyncio.Event().wait()
