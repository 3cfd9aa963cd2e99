"""The KV event subscriber against a real NDJSON stream: snapshot, deltas, gaps, restarts."""

from __future__ import annotations

import asyncio

import aiohttp
from router_fake_engine import FakeEngine

from kubellm.block_hash import hash_blocks, to_hex
from kubellm.kv_events import BlockStoredEvent
from kubellm.router.kv_events_client import KVEventSubscriber
from kubellm.router.prefix_index import PreciseIndex


async def until(pred, timeout: float = 3.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_snapshot_deltas_gap_and_restart():
    e = await FakeEngine("e").start()
    first = hash_blocks(list(range(64)))
    e.store(first[:2])  # cached before we subscribe: arrives in the snapshot
    idx = PreciseIndex()
    async with aiohttp.ClientSession() as session:
        sub = KVEventSubscriber(e.url, idx, session, retry_delay=0.05)
        sub.start()
        try:
            await until(lambda: idx.live and len(idx) == 2)
            e.store(first)
            await until(lambda: len(idx) == 4)
            e.remove(first[:1])
            await until(lambda: len(idx) == 3)
            e.clear()
            await until(lambda: len(idx) == 0)
            # a gap: the subscriber drops the replica's state and resubscribes for a fresh snapshot
            e.store(first)
            await until(lambda: len(idx) == 4)
            e.seq += 5
            line = BlockStoredEvent(seq=e.seq, parent=None, hashes=[to_hex(1)])
            for q in e.subscribers:
                q.put_nowait(line.model_dump_json().encode() + b"\n")
            await until(lambda: sub.resyncs == 1 and e.subscriptions == 2 and idx.live)
            assert set(idx.blocks) == set(first)  # the fresh snapshot, without the bogus block
            # the engine restarts (new epoch, empty cache): state is dropped, then rebuilt from the new snapshot
            await e.kill()
            await until(lambda: not idx.live)
            await e.restart()
            await until(lambda: idx.live and idx.epoch == e.epoch)
            assert len(idx) == 0
        finally:
            await sub.stop()
            await e.kill()


async def test_engine_without_events_is_not_precise():
    e = await FakeEngine("e", kv_events=False).start()
    idx = PreciseIndex()
    async with aiohttp.ClientSession() as session:
        sub = KVEventSubscriber(e.url, idx, session, retry_delay=0.05, unsupported_delay=0.05)
        sub.start()
        await until(lambda: e.kv_event_requests >= 2)  # asking again proves it handled the first 404 to the end
        assert not idx.live
        await sub.stop()
    await e.kill()
