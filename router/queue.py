"""A bounded wait for a replica: while a model has none ready (scale from zero) or all are saturated,
requests wait here up to a timeout instead of failing, then get 503 with Retry-After (never 404).
The queue's length per model is exported as kubellm_router_queued_requests{model}: the operator scales
from zero on it."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

from kubellm.openai_errors import APIError
from kubellm.router.backends import BackendRegistry
from kubellm.router.metrics import RouterMetrics

T = TypeVar("T")


class WaitQueue:
    def __init__(self, registry: BackendRegistry, metrics: RouterMetrics, max_size: int = 1024, timeout: float = 30.0):
        self.registry = registry
        self.metrics = metrics
        self.max_size = max_size
        self.timeout = timeout
        self.waiting: Counter[str] = Counter()

    def __len__(self) -> int:
        return sum(self.waiting.values())

    def _retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(min(self.timeout, 10))))}

    async def wait_for(self, model: str, try_pick: Callable[[], T | None]) -> T:
        """Return try_pick()'s first non-None result, re-trying whenever the backend set changes."""
        picked = try_pick()
        if picked is not None:
            return picked
        if len(self) >= self.max_size or self.timeout <= 0:
            raise APIError(
                503,
                f"no replica of model {model!r} can take the request now",
                code="no_replica",
                headers=self._retry_after(),
            )
        deadline = time.monotonic() + self.timeout
        self.waiting[model] += 1
        self.metrics.queued.labels(model).set(self.waiting[model])
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise APIError(
                        503,
                        f"no replica of model {model!r} became available within {self.timeout:g}s",
                        code="no_replica",
                        headers=self._retry_after(),
                    )
                await self.registry.wait_changed(min(remaining, 1.0))
                picked = try_pick()
                if picked is not None:
                    return picked
        finally:
            self.waiting[model] -= 1
            self.metrics.queued.labels(model).set(self.waiting[model])
            if not self.waiting[model]:
                del self.waiting[model]
