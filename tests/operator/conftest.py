"""Fixtures for the operator tests: a fresh KMock emulator per test, and operators on fresh kopf registries."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import kmock
import pytest
from kubellm_operator_testkit import RESOURCES, Operator, StampingEmulator

from kubellm.operator.render import RenderOptions


@pytest.fixture
async def kube() -> AsyncIterator[tuple[StampingEmulator, str]]:
    emu = StampingEmulator()
    for key, info in RESOURCES.items():
        emu.resources[key] = info
    async with emu, kmock.Server(emu) as server:
        yield emu, str(server.url).rstrip("/")


@pytest.fixture
def operator_factory(kube) -> Callable[..., Operator]:
    _, url = kube

    def make(
        interval: float = 0.3,
        options: RenderOptions | None = None,
        metrics_port: int | None = None,
        peering: str | None = None,
    ) -> Operator:
        return Operator(url, interval, options, metrics_port, peering)

    return make
