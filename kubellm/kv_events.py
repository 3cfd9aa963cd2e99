"""KV events (engine -> router), the wire types of GET /v1/kv_events.

Newline-delimited JSON: first a snapshot of every cached block, then stored/removed/cleared events with
`seq` rising by one. A consumer that sees a new `epoch` or a gap in `seq` drops what it knew of that
replica and reconnects for a fresh snapshot. `load` lines, outside the numbering, carry the engine's load.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, Field, TypeAdapter


class SnapshotEvent(BaseModel):
    type: Literal["snapshot"] = "snapshot"
    epoch: str
    seq: int
    block_size: int
    hashes: list[str]


class BlockStoredEvent(BaseModel):
    type: Literal["stored"] = "stored"
    seq: int
    parent: str | None
    hashes: list[str]


class BlockRemovedEvent(BaseModel):
    type: Literal["removed"] = "removed"
    seq: int
    hashes: list[str]


class AllBlocksClearedEvent(BaseModel):
    type: Literal["cleared"] = "cleared"
    seq: int


class LoadEvent(BaseModel):
    """The engine's whole load, sent when it changes (at most every LOAD_MIN_INTERVAL_S). It has no `seq` and
    never counts as a gap: routers (and each router worker) see only their share of the traffic, and add this
    to their own in-flight counts for the bounded-load rule."""

    type: Literal["load"] = "load"
    running: int
    waiting: int
    free_blocks: int


LOAD_MIN_INTERVAL_S = 0.05

SeqEvent = SnapshotEvent | BlockStoredEvent | BlockRemovedEvent | AllBlocksClearedEvent
KVEvent = Annotated[
    SnapshotEvent | BlockStoredEvent | BlockRemovedEvent | AllBlocksClearedEvent | LoadEvent,
    Field(discriminator="type"),
]
_adapter: TypeAdapter[KVEvent] = TypeAdapter(KVEvent)


def encode_event(event: BaseModel) -> bytes:
    return (event.model_dump_json() + "\n").encode()


def decode_event(line: bytes | str) -> SeqEvent | LoadEvent:
    return _adapter.validate_python(json.loads(line))
