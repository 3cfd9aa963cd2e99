"""AttentionMetadata.from_batch and the flashinfer page-table layout (numpy) against per-token Python references."""

from __future__ import annotations

import random

import numpy as np
import pytest

from kubellm.engine.attention.base import AttentionMetadata, flatten_block_tables, paged_kv_layout, paged_kv_layout_flat
from kubellm.engine.forward_batch import ForwardBatch, ScheduledSeq


def _random_batch(rng: random.Random, block_size: int, decode_only: bool) -> ForwardBatch:
    seqs = []
    next_block = 0
    for i in range(rng.randint(1, 12)):
        start = rng.randint(0, 70)
        n = 1 if decode_only else rng.choice([1, 1, rng.randint(1, 40)])
        blocks = -(-(start + n) // block_size) + rng.randint(0, 2)  # sometimes more blocks than needed
        ids = rng.sample(range(next_block, next_block + 3 * blocks), blocks)
        next_block += 3 * blocks
        seqs.append(ScheduledSeq(f"r{i}", [rng.randrange(100) for _ in range(n)], start, ids, True))
    return ForwardBatch(seqs)


@pytest.mark.parametrize("decode_only", [True, False])
def test_from_batch_matches_per_token_reference(decode_only: bool) -> None:
    rng = random.Random(0)
    for block_size in (1, 4, 16):
        for _ in range(30):
            batch = _random_batch(rng, block_size, decode_only)
            meta = AttentionMetadata.from_batch(batch, block_size)
            positions, slots, qsl = [], [], [0]
            for s in batch.seqs:
                qsl.append(qsl[-1] + len(s.token_ids))
                for p in range(s.start_pos, s.end_pos):
                    positions.append(p)
                    slots.append(s.block_ids[p // block_size] * block_size + p % block_size)
            width = max(len(s.block_ids) for s in batch.seqs)
            tables = [s.block_ids + [0] * (width - len(s.block_ids)) for s in batch.seqs]
            assert meta.positions.tolist() == positions
            assert meta.slot_mapping.tolist() == slots
            assert meta.query_start_loc.tolist() == qsl
            assert meta.seq_lens.tolist() == [s.end_pos for s in batch.seqs] == meta.seq_lens_list
            assert meta.context_lens.tolist() == [s.start_pos for s in batch.seqs] == meta.context_lens_list
            assert meta.block_tables.tolist() == tables
            assert meta.is_decode_only == decode_only or not decode_only


def test_from_batch_rejects_short_tables_and_empty_seqs() -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        AttentionMetadata.from_batch(ForwardBatch([ScheduledSeq("a", [1, 2], 15, [0], True)]), 16)
    with pytest.raises(ValueError, match="no tokens"):
        AttentionMetadata.from_batch(ForwardBatch([ScheduledSeq("a", [], 3, [0], True)]), 16)


def test_paged_kv_layout_matches_reference() -> None:
    rng = random.Random(1)
    for _ in range(50):
        bs = rng.choice([1, 16])
        lens = [rng.randint(1, 100) for _ in range(rng.randint(1, 9))]
        tables = [rng.sample(range(1000), -(-n // bs) + rng.randint(0, 2)) for n in lens]
        indptr, indices, last = [0], [], []
        for n, t in zip(lens, tables, strict=True):
            pages = -(-n // bs)
            indices += t[:pages]
            indptr.append(indptr[-1] + pages)
            last.append(n - (pages - 1) * bs)
        got = paged_kv_layout(lens, tables, bs)
        flat, n_blocks = flatten_block_tables(tables)
        got_flat = paged_kv_layout_flat(np.asarray(lens), flat, n_blocks, bs)
        for triple in (got, got_flat):
            assert [a.tolist() for a in triple] == [indptr, indices, last]
            assert all(a.dtype == np.int32 for a in triple)
