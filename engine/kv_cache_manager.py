"""The paged KV cache's bookkeeping: one pool of fixed-size blocks, per-request block tables, reference
counts, and the prefix cache (full blocks keyed by the chained hash the router also computes).

Pure Python over block ids: the tensors live in the model runner. Unreferenced blocks sit in a free
queue in LRU order; a cached block keeps its hash there until it is evicted for reuse, so a prompt that
comes back (or a preempted request) finds its prefix again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from kubellm.engine.request import Request

# ("stored", hashes, parent) | ("removed", hashes, None) | ("cleared", [], None)
KVEvent = tuple[str, list[int], int | None]


class NoFreeBlocksError(RuntimeError):
    pass


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up (cumulative)
    hits: int = 0  # of which found cached (cumulative)


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        on_event: Callable[[KVEvent], None] | None = None,
    ):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.on_event = on_event
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.req_blocks: dict[str, list[int]] = {}
        self.req_num_hashed: dict[str, int] = {}  # leading blocks of a request already in the prefix cache
        self.stats = PrefixCacheStats()

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_ids(self, request_id: str) -> list[int]:
        return self.req_blocks.get(request_id, [])

    def cached_block_hashes(self) -> list[int]:
        return list(self.cached)

    # ---- allocation ----------------------------------------------------------------------------
    def find_cached_prefix(self, request: Request) -> list[int]:
        """Block ids of the longest cached prefix of the request's tokens, leaving at least one token to
        compute (the last token's logits are needed to sample)."""
        if not self.enable_prefix_caching:
            return []
        request.update_block_hashes()
        max_blocks = (request.num_tokens - 1) // self.block_size
        hit: list[int] = []
        for h in request.block_hashes[:max_blocks]:
            block_id = self.cached.get(h)
            if block_id is None:
                break
            hit.append(block_id)
        return hit

    def record_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.stats.queries += num_query_tokens
        self.stats.hits += num_hit_tokens

    def allocate(self, request: Request, num_new_tokens: int, cached_prefix: list[int] | None = None) -> bool:
        """Give the request blocks to hold num_computed_tokens + num_new_tokens tokens.

        `cached_prefix` (on first scheduling) are blocks found by find_cached_prefix; they are shared,
        not copied. Returns False, changing nothing, when the pool cannot supply the blocks."""
        rid = request.request_id
        owned = self.req_blocks.get(rid)
        if owned is not None and not cached_prefix:  # a running request (every step): extend in place
            more = self.blocks_needed(request.num_computed_tokens + num_new_tokens) - len(owned)
            if more > self.num_free_blocks:
                return False
            for _ in range(more):
                owned.append(self._pop_free())
            return True
        owned = owned or []
        cached_prefix = cached_prefix or []
        total_needed = self.blocks_needed(request.num_computed_tokens + num_new_tokens)
        num_new_blocks = max(0, total_needed - len(owned) - len(cached_prefix))
        # Cached blocks sitting in the free queue stop being evictable once we take them.
        evictable_hits = sum(1 for b in cached_prefix if self.blocks[b].ref_count == 0)
        if num_new_blocks > self.num_free_blocks - evictable_hits:
            return False
        for b in cached_prefix:
            self._touch(b)
        new_ids = [self._pop_free() for _ in range(num_new_blocks)]
        blocks = [*owned, *cached_prefix, *new_ids]
        self.req_blocks[rid] = blocks
        if cached_prefix:
            self.req_num_hashed[rid] = len(cached_prefix)
        return True

    def commit_computed(self, request: Request) -> None:
        """Enter the request's newly full, computed blocks into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        blocks = self.req_blocks.get(rid, [])
        done = self.req_num_hashed.get(rid, 0)
        num_full = min(request.num_computed_tokens // self.block_size, len(blocks))
        if num_full <= done:
            return
        request.update_block_hashes()
        # A block whose last token is still in flight (async scheduling) has no hash yet: a later commit enters it.
        num_full = min(num_full, len(request.block_hashes))
        if num_full <= done:
            return
        stored: list[int] = []
        for i in range(done, num_full):
            h = request.block_hashes[i]
            block = self.blocks[blocks[i]]
            if block.block_hash is None and h not in self.cached:
                block.block_hash = h
                self.cached[h] = block.block_id
                stored.append(h)
        self.req_num_hashed[rid] = num_full
        if stored and self.on_event:
            parent = request.block_hashes[done - 1] if done > 0 else None
            self.on_event(("stored", stored, parent))

    def free(self, request: Request) -> None:
        """Release the request's blocks. Tail blocks go back first so the shared head of a prefix is the
        last to be evicted; blocks without a hash are reused before cached ones."""
        rid = request.request_id
        blocks = self.req_blocks.pop(rid, [])
        self.req_num_hashed.pop(rid, None)
        for b in reversed(blocks):
            block = self.blocks[b]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[b] = None
                if block.block_hash is None:
                    self.free_queue.move_to_end(b, last=False)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash (only when nothing is running, as vLLM does)."""
        if any(self.req_blocks.values()):
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()
        if self.on_event:
            self.on_event(("cleared", [], None))
        return True

    # ---- internals -----------------------------------------------------------------------------
    def _touch(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        if not self.free_queue:
            raise NoFreeBlocksError("no free KV cache blocks")
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            # Evict: this block's content is about to be overwritten.
            evicted = block.block_hash
            del self.cached[evicted]
            block.block_hash = None
            if self.on_event:
                self.on_event(("removed", [evicted], None))
        block.ref_count = 1
        return block_id
