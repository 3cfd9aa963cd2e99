"""What the router knows of each replica's prefix cache, always bounded in memory.

Precise: each replica's cached block hashes exactly as its KV event stream reports them, never more than
that replica's KV capacity in blocks (its real cache cannot hold more; a missed `removed` event cannot grow
the set past it). Pending: the blocks of requests in flight on a replica, which its cache is about to hold
although no `stored` event has arrived yet. Approximate: the router's own record of which blocks it sent
where, one LRU bounded by a configured number of (replica, block) entries, used for replicas without an
event stream.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

import xxhash

from kubellm.block_hash import from_hex
from kubellm.kv_events import AllBlocksClearedEvent, BlockRemovedEvent, BlockStoredEvent, SnapshotEvent

DEFAULT_PRECISE_CAPACITY = 1 << 20  # blocks, when a replica has not (yet) reported its KV capacity
DEFAULT_APPROX_SIZE = 200_000  # (replica, block) entries


class ApplyResult(Enum):
    OK = "ok"
    RESYNC = "resync"  # new epoch or a gap in seq: drop what we knew and resubscribe


@dataclass
class PreciseIndex:
    """One replica's cached blocks, fed by its KV events (snapshot, then seq-numbered deltas)."""

    capacity: int = DEFAULT_PRECISE_CAPACITY
    blocks: dict[int, None] = field(default_factory=dict)  # insertion-ordered set: oldest first
    epoch: str | None = None
    seq: int | None = None
    block_size: int | None = None
    live: bool = False  # a snapshot arrived and no gap has been seen since

    def apply(self, event: SnapshotEvent | BlockStoredEvent | BlockRemovedEvent | AllBlocksClearedEvent) -> ApplyResult:
        if isinstance(event, SnapshotEvent):
            self.blocks = {}
            self._add(event.hashes)
            self.epoch, self.seq, self.block_size, self.live = event.epoch, event.seq, event.block_size, True
            return ApplyResult.OK
        if not self.live or self.seq is None or event.seq != self.seq + 1:
            self.drop()
            return ApplyResult.RESYNC
        self.seq = event.seq
        if isinstance(event, BlockStoredEvent):
            self._add(event.hashes)
        elif isinstance(event, BlockRemovedEvent):
            for h in event.hashes:
                self.blocks.pop(from_hex(h), None)
        else:
            self.blocks.clear()
        return ApplyResult.OK

    def _add(self, hashes: Sequence[str]) -> None:
        blocks = self.blocks
        for h in hashes:
            k = from_hex(h)
            blocks.pop(k, None)
            blocks[k] = None
        while len(blocks) > self.capacity:
            del blocks[next(iter(blocks))]

    def drop(self) -> None:
        self.blocks = {}
        self.live = False
        self.epoch = self.seq = None

    def set_capacity(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        while len(self.blocks) > self.capacity:
            del self.blocks[next(iter(self.blocks))]

    def __len__(self) -> int:
        return len(self.blocks)


def _slot_salt(slot: int) -> int:
    return xxhash.xxh3_64_intdigest(b"kubellm-slot/%d" % slot)


class ApproxIndex:
    """The router's own record of (replica, block) sends, LRU-bounded by `max_entries`.

    An entry's key is the block hash XOR a 64-bit salt of the replica (one integer operation per block on the hot
    path, and a 64-bit text hash stays a 64-bit key), its value the replica. Two entries collide only if two hashes
    differ by exactly two replicas' salts: never in practice for 128-bit token-block hashes, a ~1e-9 chance over a
    full index of 64-bit text hashes (a spurious match costs a cache miss).

    Prefix-closed: the hashes given are chained (block i's hash stands for blocks 0..i, as `hash_blocks` and
    `text_block_hashes` make them), and `record` touches a prompt's blocks deepest first, its head last. Every touch
    of block i is then followed, in the same call, by touches of blocks 0..i-1, so the LRU always evicts a block
    before any block of its prefix (as an engine's cache frees a sequence's tail first), and what a replica holds of
    a prompt is always its first m blocks for some m. `match` finds m with a few probes (the first block, a guess,
    a binary search) instead of walking all m blocks: the walk over every replica for every request was the largest
    share of a routed request's prefix work with 8 replicas (bench/router.py stages)."""

    def __init__(self, max_entries: int = DEFAULT_APPROX_SIZE):
        self.max_entries = max(1, max_entries)
        self._lru: OrderedDict[int, int] = OrderedDict()
        self._per_slot: Counter[int] = Counter()
        self._salts: dict[int, int] = {}

    def _salt(self, slot: int) -> int:
        salt = self._salts.get(slot)
        if salt is None:
            salt = self._salts[slot] = _slot_salt(slot)
        return salt

    def record(self, slot: int, hashes: Sequence[int]) -> None:
        lru = self._lru
        salt = self._salt(slot)
        added = 0
        touch = lru.move_to_end
        for h in reversed(hashes):  # deepest first: the head is touched last, so it is evicted last (prefix-closed)
            k = h ^ salt
            try:
                touch(k)
            except KeyError:
                lru[k] = slot
                added += 1
        if added:
            self._per_slot[slot] += added
            if len(lru) > self.max_entries:
                per_slot = self._per_slot
                pop = lru.popitem
                for _ in range(len(lru) - self.max_entries):
                    per_slot[pop(last=False)[1]] -= 1

    def footprint(self, slot: int) -> int:
        """Distinct blocks recorded for `slot`: the share of the fleet's working set the router put there."""
        return self._per_slot.get(slot, 0)

    def match(self, slot: int, hashes: Sequence[int]) -> int:
        return leading_held(self._lru, self._salt(slot), hashes)

    def __len__(self) -> int:
        return len(self._lru)


def leading_held(held: Container[int], salt: int, hashes: Sequence[int], guesses: Sequence[int] = ()) -> int:
    """How many leading `hashes` are in `held` (XORed with `salt`), given that what is held of them is a prefix (see
    ApproxIndex). Probes the first block, then each of `guesses` (lengths other replicas just gave: replicas often hold
    the same shared head), then binary-searches what is left: O(log n) probes, where walking the prefix took m."""
    if not hashes or hashes[0] ^ salt not in held:
        return 0
    return _held_after_head(held, salt, hashes, guesses)


def _held_after_head(held: Container[int], salt: int, hashes: Sequence[int], guesses: Sequence[int]) -> int:
    """leading_held once the first block is known to be held (match_all probes it inline for every replica)."""
    n = len(hashes)
    lo, hi = 1, n  # the answer m lies in [lo, hi]: blocks < lo are held, blocks >= hi are not (or do not exist)
    for g in guesses:  # is the answer g? each probe narrows [lo, hi] whatever it finds
        if g < lo or g > hi:
            continue
        if g > lo:
            if hashes[g - 1] ^ salt not in held:
                hi = g - 1
                continue
            lo = g
        if g == hi or hashes[g] ^ salt not in held:
            return g
        lo = g + 1
    while lo < hi:
        mid = (lo + hi) >> 1  # is block `mid` held? then m > mid
        if hashes[mid] ^ salt in held:
            lo = mid + 1
        else:
            hi = mid
    return lo


class PrefixIndex:
    """Per-replica match length: precise (events + pending) where a live stream exists, else approximate."""

    def __init__(self, approx_size: int = DEFAULT_APPROX_SIZE, use_events: bool = True):
        self.use_events = use_events
        self.approx = ApproxIndex(approx_size)
        self.precise: dict[int, PreciseIndex] = {}
        self.pending: dict[int, Counter[int]] = {}

    def replica(self, slot: int) -> PreciseIndex:
        idx = self.precise.get(slot)
        if idx is None:
            idx = self.precise[slot] = PreciseIndex()
        return idx

    def is_precise(self, slot: int) -> bool:
        idx = self.precise.get(slot)
        return self.use_events and idx is not None and idx.live

    def match(self, slot: int, hashes: Sequence[int]) -> int:
        if not hashes:
            return 0
        if not self.is_precise(slot):
            return self.approx.match(slot, hashes)
        blocks = self.precise[slot].blocks
        pending: Counter[int] = self.pending.get(slot) or Counter()
        n = 0
        for h in hashes:
            if h not in blocks and h not in pending:
                break
            n += 1
        return n

    def match_all(self, slots: Sequence[int], hashes: Sequence[int]) -> list[int]:
        """[match(slot, hashes) for slot in slots], in one call: the router asks it for every candidate of every
        request, and the per-replica calls (precise or not, the replica's salt, the walk) were a visible share of
        a routed request's CPU with 8 replicas."""
        if not hashes:
            return [0] * len(slots)
        out = []
        approx = self.approx
        lru, salts = approx._lru, approx._salts
        precise = self.precise if self.use_events else None
        guesses: list[int] = []  # the distinct lengths found so far, in the order found (the first is most common)
        head = hashes[0]
        n = len(hashes)
        for slot in slots:
            if precise is not None and (idx := precise.get(slot)) is not None and idx.live:
                out.append(self.match(slot, hashes))
                continue
            salt = salts.get(slot)
            if salt is None:
                salt = approx._salt(slot)
            if head ^ salt not in lru:  # (leading_held's first probe, inline: most replicas hold none of a prompt)
                out.append(0)
                continue
            if guesses:  # the first guess, inline (_held_after_head's first step): replicas share a head's length
                g = guesses[0]
                if (g == 1 or hashes[g - 1] ^ salt in lru) and (g == n or hashes[g] ^ salt not in lru):
                    out.append(g)
                    continue
            m = _held_after_head(lru, salt, hashes, guesses)
            if m not in guesses and len(guesses) < 4:
                guesses.append(m)
            out.append(m)
        return out

    def footprint(self, slot: int) -> int:
        """How much of the fleet's working set the router has placed on `slot` (see ApproxIndex.footprint)."""
        return self.approx.footprint(slot)

    def footprints(self) -> Mapping[int, int]:
        """Every slot's footprint at once (read it, never write it; a slot absent from it has none)."""
        return self.approx._per_slot

    def on_send(self, slot: int, hashes: Sequence[int]) -> None:
        if not hashes:
            return
        self.approx.record(slot, hashes)
        if self.use_events:  # (pending blocks only ever count for replicas with an event stream)
            self.pending.setdefault(slot, Counter()).update(hashes)

    def on_done(self, slot: int, hashes: Sequence[int]) -> None:
        pending = self.pending.get(slot)
        if pending is None or not hashes:
            return
        for h in hashes:  # one pass (Counter.subtract, then a pass dropping zeros, cost ~2x on the hot path)
            n = pending.get(h, 0) - 1
            if n > 0:
                pending[h] = n
            else:
                pending.pop(h, None)
        if not pending:
            del self.pending[slot]

    def drop_replica(self, slot: int) -> None:
        """A replica left: forget its precise state (its approximate entries age out of the LRU)."""
        self.precise.pop(slot, None)
        self.pending.pop(slot, None)
