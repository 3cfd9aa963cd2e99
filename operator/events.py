"""Kubernetes Events about an LLMDeployment (scaling decisions, invalid specs), posted through our own client.

kopf's `kopf.event` works only inside kopf's per-object handler tasks; the operator's periodic pass runs outside
them, so every Event goes through this one poster instead.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from kubellm.operator.kube import Kind, KubeClient

EVENT = Kind("v1", "Event", "events")
COMPONENT = "kubellm-operator"
MAX_MESSAGE = 1000

log = logging.getLogger("kubellm.operator.events")


def event_manifest(body: Mapping[str, Any], type_: str, reason: str, message: str, now: datetime) -> dict[str, Any]:
    """A core/v1 Event about `body` (pure: the caller supplies the time)."""
    meta = body["metadata"]
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": body.get("apiVersion"),
            "kind": body.get("kind"),
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
        },
        "type": type_,
        "reason": reason,
        "message": message[:MAX_MESSAGE],
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


class EventPoster:
    """Posts Events in the background: a reconcile never waits on (or fails because of) an Event."""

    def __init__(self, client: KubeClient) -> None:
        self.client = client
        self._pending: set[asyncio.Task[None]] = set()

    def post(self, body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        manifest = event_manifest(body, type_, reason, message, datetime.now(UTC))
        task = asyncio.get_running_loop().create_task(self._create(manifest))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _create(self, manifest: dict[str, Any]) -> None:
        try:
            await self.client.create(EVENT, manifest["metadata"]["namespace"], manifest)
        except Exception as e:  # an Event is best effort
            log.warning("could not post event %s: %s", manifest["reason"], e)

    async def flush(self) -> None:
        """Wait for the Events in flight (at shutdown)."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
