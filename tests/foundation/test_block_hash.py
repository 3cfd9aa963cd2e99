"""The chained prefix block hash (GUIDE.md §2), pinned with fixed vectors so engine and router agree."""

from __future__ import annotations

import struct

import xxhash

from kubellm.block_hash import from_hex, hash_blocks, root_hash, to_hex


def test_root_is_xxh3_128_of_the_domain_and_extra():
    assert root_hash() == xxhash.xxh3_128_intdigest(b"kubellm/1|")
    assert root_hash("lora-a") == xxhash.xxh3_128_intdigest(b"kubellm/1|lora-a")


def test_chain_follows_the_spec_byte_for_byte():
    tokens = list(range(40))
    r = root_hash()
    h0 = xxhash.xxh3_128_intdigest(r.to_bytes(16, "big") + struct.pack("<16I", *tokens[:16]))
    h1 = xxhash.xxh3_128_intdigest(h0.to_bytes(16, "big") + struct.pack("<16I", *tokens[16:32]))
    assert hash_blocks(tokens) == [h0, h1]  # the partial third block is not hashed


def test_fixed_vectors():
    hs = [to_hex(h) for h in hash_blocks(list(range(32)))]
    assert hs == FIXED_VECTORS
    assert all(len(h) == 32 and h == h.lower() for h in hs)
    assert [from_hex(h) for h in hs] == hash_blocks(list(range(32)))


def test_salt_separates_and_continuation_matches():
    tokens = list(range(100, 164))
    assert hash_blocks(tokens, extra="a") != hash_blocks(tokens, extra="b")
    full = hash_blocks(tokens)
    assert hash_blocks(tokens, start_block=2, parent=full[1]) == full[2:]


FIXED_VECTORS = ["df814e0eb8e33a3b1316ec5a95e7df3f", "174324de8921c567738711196e4ff065"]


def test_any_length_block_size_and_continuation_follow_the_spec():
    """Lengths around block boundaries, other block sizes, continuation from a parent, tuples: each hash is the
    spec's (parent as 16 big-endian bytes + the block's ids as little-endian uint32, xxh3_128), computed here block
    by block; ids outside uint32 are refused as before."""
    import random

    import pytest

    rng = random.Random(3)
    for _ in range(200):
        bs = rng.choice([1, 4, 16, 64])
        tokens = [rng.randrange(1 << 32) for _ in range(rng.randrange(0, 5 * bs + 3))]
        start = rng.randrange(0, 4)
        parent = rng.choice([None, rng.getrandbits(128)])
        h = root_hash("x") if parent is None else parent
        expect = []
        for i in range(start, len(tokens) // bs):
            block = tokens[i * bs : (i + 1) * bs]
            h = xxhash.xxh3_128_intdigest(h.to_bytes(16, "big") + struct.pack(f"<{bs}I", *block))
            expect.append(h)
        assert hash_blocks(tokens, bs, "x", start_block=start, parent=parent) == expect
        assert hash_blocks(tuple(tokens), bs, "x", start_block=start, parent=parent) == expect
    with pytest.raises(struct.error):
        hash_blocks([1] * 15 + [-1])
    with pytest.raises(struct.error):
        hash_blocks([1 << 32] * 16)
