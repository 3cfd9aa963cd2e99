"""Reading a GET /v1/kv_events stream in tests: the seq-numbered events, past the `load` lines between them."""

from __future__ import annotations

import asyncio

import aiohttp

from kubellm.kv_events import LoadEvent, SeqEvent, decode_event


async def next_seq_event(content: aiohttp.StreamReader, timeout: float = 5.0) -> SeqEvent:
    """The next snapshot/stored/removed/cleared event (load lines carry no seq and are skipped)."""
    while True:
        ev = decode_event(await asyncio.wait_for(content.readline(), timeout))
        if not isinstance(ev, LoadEvent):
            return ev
