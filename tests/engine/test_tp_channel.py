"""The shared-memory command ring of tensor-parallel replicas (engine/tp_channel.py): every worker gets every
command, in order, whole, however large; a full ring makes the writer wait, and a dead reader ends the wait."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest

from kubellm.engine.tp_channel import ShmBroadcastReader, ShmBroadcastWriter


def _echo_worker(spec, index: int, results) -> None:
    reader = ShmBroadcastReader(spec, index)
    got = []
    while True:
        message = reader.recv()
        if message == "stop":
            break
        got.append(message)
    results.put((index, got))
    reader.close()


def test_every_reader_gets_every_message_in_order_including_ones_larger_than_a_slot() -> None:
    writer = ShmBroadcastWriter(readers=2, slots=4, slot_bytes=1024)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_echo_worker, args=(writer.spec(), i, results)) for i in range(2)]
    for p in procs:
        p.start()
    messages = [("execute", list(range(n)), {"n": n}) for n in (0, 1, 5000, 3, 100_000)] + [b"x" * 3000]
    messages += [i for i in range(50)]  # many small ones: the ring wraps around many times
    try:
        for m in messages:
            writer.send(m)
        writer.send("stop")
        got = dict(results.get(timeout=60) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=10)
        writer.close()
    assert got[0] == messages and got[1] == messages


def test_the_file_is_gone_after_unlink_while_mappings_keep_working() -> None:
    writer = ShmBroadcastWriter(readers=1)
    path = writer.spec()[0]
    reader = ShmBroadcastReader(writer.spec(), 0)
    writer.unlink()
    assert not os.path.exists(path)
    writer.send({"step": 1})
    assert reader.recv() == {"step": 1}
    reader.close()
    writer.close()


def test_a_full_ring_blocks_the_writer_until_check_gives_up() -> None:
    writer = ShmBroadcastWriter(readers=1, slots=2, slot_bytes=64)
    reader = ShmBroadcastReader(writer.spec(), 0)
    writer.send(1)
    writer.send(2)  # the ring is full now: nobody consumed either slot

    def dead() -> None:
        raise RuntimeError("reader exited")

    with pytest.raises(RuntimeError, match="reader exited"):
        writer.send(3, check=dead)
    assert reader.recv() == 1  # what was sent stays intact
    assert reader.recv() == 2
    reader.close()
    writer.close()


def test_a_reader_index_outside_the_ring_is_refused() -> None:
    writer = ShmBroadcastWriter(readers=1)
    with pytest.raises(ValueError, match="reader index 1"):
        ShmBroadcastReader(writer.spec(), 1)
    writer.close()
