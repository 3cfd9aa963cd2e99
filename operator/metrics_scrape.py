"""Reads the load signals the autoscaler needs from engines' and routers' Prometheus text.

Names come from kubellm.metric_names (vLLM's for engines), so the operator scales a vLLM fleet too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from kubellm import metric_names as mn


@dataclass(frozen=True)
class EngineLoad:
    waiting: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0  # 0-1 fraction


def _samples(text: str, family: str, model: str | None, label: str) -> list[float]:
    """Values of `family`'s samples whose `label` is `model` (any when the label is absent)."""
    out: list[float] = []
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError:
        return out
    for fam in families:
        for s in fam.samples:
            if s.name != family:
                continue
            got = s.labels.get(label)
            if model is None or got is None or got == model:
                out.append(float(s.value))
    return out


def parse_engine_metrics(text: str, model: str | None = None) -> EngineLoad:
    return EngineLoad(
        waiting=sum(_samples(text, mn.NUM_REQUESTS_WAITING, model, "model_name")),
        running=sum(_samples(text, mn.NUM_REQUESTS_RUNNING, model, "model_name")),
        kv_usage=max(_samples(text, mn.KV_CACHE_USAGE_PERC, model, "model_name"), default=0.0),
    )


def parse_router_queued(text: str, model: str | None = None) -> float:
    return sum(_samples(text, mn.ROUTER_QUEUED, model, "model"))


async def fetch_text(session: aiohttp.ClientSession, url: str, timeout: float = 2.0) -> str | None:
    """The body of `url`, or None when it does not answer in time (a dead replica is not a load signal)."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                return None
            return await resp.text()
    except (TimeoutError, aiohttp.ClientError, OSError):
        return None


async def fetch_all(session: aiohttp.ClientSession, urls: Iterable[str], timeout: float = 2.0) -> list[str | None]:
    return list(await asyncio.gather(*(fetch_text(session, u, timeout) for u in urls)))
