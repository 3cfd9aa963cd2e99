"""Rank 0's per-step commands to the tensor-parallel workers, through a shared-memory ring on this host.

Why not a gloo broadcast: a pickled object over gloo costs two TCP messages and a thread hand-off per step, and a
worker learns of a step only when its gloo receive completes; at batch 1 that was ~1 ms of GPU idle per step
(bench/results/engine-gpu-2026-11-28-tp-async.md). Here the writer copies the pickle into a slot and bumps the
slot's sequence number; readers spin on it, so a command reaches the workers in microseconds.

Layout of the mapped file: one 8-byte "consumed up to" counter per reader, then `slots` slots of
[seq int64 | nbytes int64 | last int64 | payload]. A message larger than a slot spans consecutive slots (`last`
marks its final chunk). The writer reuses a slot only when every reader has consumed it. The sequence number is
written after the payload and read before it, with a fence between (a lock round trip: a full barrier, which
x86 does not need and weakly ordered CPUs do).

The file lives in /dev/shm when there is one and is unlinked as soon as every worker has mapped it, so a killed
replica leaves nothing behind.
"""

from __future__ import annotations

import mmap
import os
import pickle
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

SLOT_HEADER = struct.Struct("<qqq")  # seq, nbytes, last
COUNTER = struct.Struct("<q")
DEFAULT_SLOTS = 8
DEFAULT_SLOT_BYTES = 512 * 1024
HOT_SPIN_S = 0.05  # spin this long before backing off to short sleeps (a step's command arrives well within it)
IDLE_AFTER_S = 1.0  # then sleep a millisecond per poll: an idle server's workers cost no CPU to speak of

_fence_lock = threading.Lock()


def _fence() -> None:
    with _fence_lock:
        pass


def _wait(ready: Callable[[], bool], check: Callable[[], None] | None, hot_spin_s: float = HOT_SPIN_S) -> None:
    """Poll `ready` hot for `hot_spin_s`, then with sleeps; `check` runs between sleeps (raises to give up)."""
    start = time.monotonic()
    spins = 0
    while not ready():
        spins += 1
        if spins < 64:
            continue
        waited = time.monotonic() - start
        if waited < hot_spin_s:
            continue
        if check is not None:
            check()
        time.sleep(0.0001 if waited < IDLE_AFTER_S else 0.001)
    _fence()


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


class _Ring:
    def __init__(self, path: str, readers: int, slots: int, slot_bytes: int, create: bool):
        self.path, self.readers, self.slots, self.slot_bytes = path, readers, slots, slot_bytes
        self.slot_size = SLOT_HEADER.size + slot_bytes
        size = readers * COUNTER.size + slots * self.slot_size
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self.buf = mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def slot_offset(self, seq: int) -> int:
        return self.readers * COUNTER.size + (seq % self.slots) * self.slot_size

    def consumed(self, reader: int) -> int:
        return COUNTER.unpack_from(self.buf, reader * COUNTER.size)[0]

    def close(self) -> None:
        self.buf.close()


class ShmBroadcastWriter:
    """Rank 0's end. `spec()` is what a reader needs to attach (it pickles into the worker's arguments)."""

    def __init__(self, readers: int, slots: int = DEFAULT_SLOTS, slot_bytes: int = DEFAULT_SLOT_BYTES):
        if readers < 1:
            raise ValueError("a broadcast needs at least one reader")
        path = os.path.join(_shm_dir(), f"kubellm-tp-{os.getpid()}-{uuid.uuid4().hex[:12]}")
        self._ring = _Ring(path, readers, slots, slot_bytes, create=True)
        self._seq = 0
        self._unlinked = False

    def spec(self) -> tuple[str, int, int, int]:
        r = self._ring
        return (r.path, r.readers, r.slots, r.slot_bytes)

    def unlink(self) -> None:
        """Remove the file's name once every reader has mapped it (the mappings stay valid)."""
        if not self._unlinked:
            self._unlinked = True
            try:
                os.unlink(self._ring.path)
            except FileNotFoundError:
                pass

    def send(self, message: Any, check: Callable[[], None] | None = None) -> None:
        """Publish `message` to every reader. Blocks only while the ring is full (readers a whole ring behind);
        `check` runs while it waits and raises to give up (e.g. a reader's process died)."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        ring = self._ring
        view = memoryview(data)
        while True:
            chunk, view = view[: ring.slot_bytes], view[ring.slot_bytes :]
            seq = self._seq + 1
            oldest = seq - ring.slots  # the message this slot last held: every reader must be past it

            def free(oldest: int = oldest) -> bool:
                return all(ring.consumed(r) >= oldest for r in range(ring.readers))

            if not free():
                _wait(free, check)
            off = ring.slot_offset(seq)
            body = off + SLOT_HEADER.size
            ring.buf[body : body + len(chunk)] = chunk
            struct.pack_into("<qq", ring.buf, off + 8, len(chunk), 0 if len(view) else 1)
            _fence()
            COUNTER.pack_into(ring.buf, off, seq)  # publishes the slot
            self._seq = seq
            if not len(view):
                return

    def close(self) -> None:
        self.unlink()
        self._ring.close()


class ShmBroadcastReader:
    """A worker's end: `recv()` returns the messages in the order they were sent."""

    def __init__(self, spec: tuple[str, int, int, int], reader_index: int, hot_spin_s: float = HOT_SPIN_S):
        """`hot_spin_s`: how long a wait spins before it sleeps between polls (0 where cores are scarce: CPU
        ranks need every core for their share of the forward)."""
        path, readers, slots, slot_bytes = spec
        if not 0 <= reader_index < readers:
            raise ValueError(f"reader index {reader_index} outside 0..{readers - 1}")
        self._ring = _Ring(path, readers, slots, slot_bytes, create=False)
        self._index = reader_index
        self._hot_spin_s = hot_spin_s
        self._seq = 0

    def recv(self, check: Callable[[], None] | None = None) -> Any:
        ring = self._ring
        parts: list[bytes] = []
        while True:
            seq = self._seq + 1
            off = ring.slot_offset(seq)

            def published(off: int = off, seq: int = seq) -> bool:
                return COUNTER.unpack_from(ring.buf, off)[0] == seq

            _wait(published, check, self._hot_spin_s)
            _, nbytes, last = SLOT_HEADER.unpack_from(ring.buf, off)
            body = off + SLOT_HEADER.size
            parts.append(ring.buf[body : body + nbytes])
            _fence()
            COUNTER.pack_into(ring.buf, self._index * COUNTER.size, seq)  # the writer may reuse the slot
            self._seq = seq
            if last:
                return pickle.loads(parts[0] if len(parts) == 1 else b"".join(parts))

    def close(self) -> None:
        self._ring.close()
