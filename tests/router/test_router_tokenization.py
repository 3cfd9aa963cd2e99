"""The router's prompt -> block hashes agree with what the engine computes from the same request."""

from __future__ import annotations

import asyncio
import json

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st
from router_fake_engine import word_tokenizer_info, words

from kubellm.block_hash import hash_blocks
from kubellm.prompt import PromptRenderer
from kubellm.router.tokenization import (
    TEXT_BLOCK_CHARS,
    PromptHasher,
    SegmentCache,
    prompt_token_ids,
    text_block_hashes,
)

R = PromptRenderer(word_tokenizer_info())


def word_ids(start: int, n: int) -> list[int]:
    """The word tokenizer's ids for words(start, n): w<k> is id k + 4 (after [UNK] and three chat markers)."""
    return [4 + (start + i) % 2000 for i in range(n)]


def test_completion_prompt_forms():
    """Which prompt of a completion request the router hashes, and how (chat prompts: the cross-boundary test
    against the real engine, tests/engine_server/test_prompt_boundary.py)."""
    text = words(5, 50)
    assert prompt_token_ids(R, "completion", {"prompt": text}) == word_ids(5, 50)
    assert prompt_token_ids(R, "completion", {"prompt": [text, "w1"]}) == word_ids(5, 50)  # the first prompt
    assert prompt_token_ids(R, "completion", {"prompt": [1, 2, 3]}) == [1, 2, 3]
    assert prompt_token_ids(R, "completion", {"prompt": None}) is None
    for bad in ([1, -2], [1, 2**32]):  # no uint32: the engine refuses them; routing must not crash on them
        assert prompt_token_ids(R, "completion", {"prompt": bad}) is None


async def test_hasher_uses_salt_block_size_and_falls_back_to_text():
    async def fetch(model):
        return word_tokenizer_info() if model == "m" else None

    h = PromptHasher(fetch)
    body = {"prompt": words(0, 64)}
    key = await h.key("m", "completion", body)
    assert key.exact and key.hashes == hash_blocks(word_ids(0, 64), 16)
    salted = await h.key("m", "completion", {**body, "cache_salt": "tenant-a"})
    assert salted.hashes == hash_blocks(word_ids(0, 64), 16, "tenant-a") != key.hashes
    h.block_sizes["m"] = 32
    assert len((await h.key("m", "completion", body)).hashes) == 2
    fallback = await h.key("other", "completion", body)
    assert not fallback.exact and fallback.hashes == text_block_hashes(words(0, 64))
    big = {"prompt": words(0, 8000)}  # long prompts are tokenized off the event loop, same result
    assert (await h.key("m", "completion", big)).hashes == hash_blocks(word_ids(0, 8000), 32)


async def test_text_key_now_answers_only_when_key_would_hash_text():
    """The coroutine-free shortcut: for a model whose tokenizer fetch just failed it gives key()'s text-block key (salt
    included, chat and completion); for a model with a tokenizer, or none tried yet, it declines (None), so the
    awaited path loads the tokenizer and hashes token blocks as before."""
    fetched: list[str] = []

    async def fetch(model):
        fetched.append(model)
        return word_tokenizer_info() if model == "m" else None

    h = PromptHasher(fetch)
    chat = {"messages": [{"role": "user", "content": words(0, 40)}], "cache_salt": "t"}
    completion = {"prompt": words(3, 40)}
    assert h.text_key_now("other", "chat", chat) is None  # never tried: key() must start the fetch
    want_chat, want_completion = await h.key("other", "chat", chat), await h.key("other", "completion", completion)
    assert fetched == ["other"] and not want_chat.exact
    assert want_chat.hashes == text_block_hashes('[{"role":"user","content":"' + words(0, 40) + '"}]', "t")
    assert h.text_key_now("other", "chat", chat) == want_chat
    assert h.text_key_now("other", "completion", completion) == want_completion
    assert want_completion.hashes == text_block_hashes(words(3, 40))
    assert (await h.key("m", "completion", completion)).exact
    assert h.text_key_now("m", "completion", completion) is None  # a tokenizer: token blocks, via key()


async def test_tokenizer_off_keys_every_request_by_text_blocks():
    """--tokenizer off: no tokenizer is ever fetched, every key is the text-block key at once (no await needed), at
    the configured block size."""
    fetched: list[str] = []

    async def fetch(model):
        fetched.append(model)
        return word_tokenizer_info()

    h = PromptHasher(fetch, text_block_chars=128, tokenizer=False)
    body = {"prompt": words(0, 200), "cache_salt": "s"}
    now = h.text_key_now("m", "completion", body)
    h.prefetch("m")
    key = await h.key("m", "completion", body)
    assert now == key and not key.exact and key.block_tokens == 32
    assert key.hashes == text_block_hashes(words(0, 200), "s", 128) and len(key.hashes) >= 4
    assert fetched == [] and h.settled("m")


def _bpe_with_special_tokens() -> PromptRenderer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from kubellm.prompt import TokenizerInfo

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["You are a helpful assistant. Answer briefly, politely and well.", "hello world  \n\t é ü 123"] * 50
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>"]))
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return PromptRenderer(TokenizerInfo(tokenizer_json=tok.to_str(), chat_template=template))


SPECIAL = _bpe_with_special_tokens()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="ab \n\té<|>imstartendü.", max_size=40), min_size=1, max_size=6))
def test_segment_cache_equals_full_encoding(pieces):
    seg = SegmentCache(SPECIAL)
    assert seg.enabled
    text = "".join(p + ("<|im_start|>" if i % 2 else "<|im_end|>") for i, p in enumerate(pieces))
    for _ in range(2):  # cold and cached
        assert seg.encode(text) == SPECIAL.tokenizer.encode(text, add_special_tokens=False).ids


def test_repeated_system_prompt_is_a_cache_hit():
    seg = SegmentCache(SPECIAL)
    system = "You are a helpful assistant. " * 20
    for i in range(3):
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": f"question {i}"}]
        text = SPECIAL.render_chat(msgs)
        assert prompt_token_ids(SPECIAL, "chat", {"messages": msgs}, seg) == SPECIAL.tokenizer.encode(text).ids
    assert len(seg._cache) == 1  # the system prompt's piece, tokenized once


def test_segment_cache_disables_itself_for_word_tokenizers():
    assert not SegmentCache(R).enabled  # no added tokens: plain encoding
    msgs = [{"role": "user", "content": words(0, 30)}]
    user, assistant = 2, 3  # <|user|>, <|assistant|>
    assert prompt_token_ids(R, "chat", {"messages": msgs}, SegmentCache(R)) == [user, *word_ids(0, 30), assistant]


async def test_offloaded_tokenization_equals_inline_and_fills_the_segment_cache():
    """Long prompts are tokenized in a worker thread (the loop keeps serving); the ids, hashes and the segment cache
    come out as when everything runs on the loop, concurrent requests included."""

    async def fetch(model):
        return SPECIAL.info if model == "bpe" else word_tokenizer_info()

    system = "You are a helpful assistant. Answer briefly. " * 40  # ~1.8k characters, cached after its first use
    bodies = [
        {"messages": [{"role": "system", "content": system}, {"role": "user", "content": f"question {i} " * 200}]}
        for i in range(6)
    ]
    inline, offloaded = PromptHasher(fetch, offload_above_chars=None), PromptHasher(fetch, offload_above_chars=100)
    try:
        want = [await inline.key("bpe", "chat", b) for b in bodies]
        got = await asyncio.gather(*(offloaded.key("bpe", "chat", b) for b in bodies))
        assert [k.hashes for k in got] == [k.hashes for k in want] and all(k.exact for k in got)
        for b in bodies:
            text = SPECIAL.render_chat(b["messages"])
            assert prompt_token_ids(SPECIAL, "chat", b) == SPECIAL.tokenizer.encode(text).ids
        assert system in "".join(offloaded._segments["bpe"]._cache)  # filled on the loop from the thread's ids
        long_completion = {"prompt": words(0, 2000)}  # no segment cache: the whole text in the thread
        assert (await offloaded.key("w", "completion", long_completion)).hashes == hash_blocks(word_ids(0, 2000), 16)
    finally:
        inline.close()
        offloaded.close()


@pytest.mark.parametrize("bc", [64, TEXT_BLOCK_CHARS])
def test_text_block_hashes_follow_their_definition(bc):
    """Chained xxh3_64 over full `bc`-byte blocks of the UTF-8 text, each seeded with the previous hash, from a root
    over the text domain and the salt; a partial last block is not hashed. (Written out here from the definition, so a
    faster implementation must give the same values. The definition is router-internal: text hashes meet only the
    router's own record of its sends, never an engine's events or another router, so changing it, as version 2 did,
    or its block size, changes no agreement between processes.)"""
    text = ("é" * 40 + "".join(chr(0x4E00 + i) for i in range(30)) + "x" * 57) * (bc // 64)  # multi-byte characters
    data = text.encode()
    h = xxhash.xxh3_64_intdigest(b"kubellm-text/2|salt")
    expect = []
    for i in range(len(data) // bc):
        h = xxhash.xxh3_64_intdigest(data[bc * i : bc * i + bc], h)
        expect.append(h)
    assert len(expect) == 3 and text_block_hashes(text, "salt", bc) == expect
    assert text_block_hashes(text, "salt", bc) != text_block_hashes(
        text, "", bc
    )  # the salt (cache_salt) keys the chain
    assert text_block_hashes("x" * (bc - 1), "", bc) == []


def _chained(data: bytes, extra: str = "", bc: int = TEXT_BLOCK_CHARS) -> list[int]:
    """The text-block definition written out (as in the test above)."""
    h = xxhash.xxh3_64_intdigest(b"kubellm-text/2|" + extra.encode())
    out = []
    for i in range(len(data) // bc):
        h = xxhash.xxh3_64_intdigest(data[bc * i : bc * i + bc], h)
        out.append(h)
    return out


@settings(max_examples=60, deadline=None)
@given(
    turns=st.lists(st.tuples(st.integers(0, 1999), st.integers(0, 260)), min_size=1, max_size=5),
    salt=st.sampled_from(["", "t1", "é"]),
    repeat=st.integers(1, 3),
    bc=st.sampled_from([64, 100, TEXT_BLOCK_CHARS, 512]),
)
def test_text_keys_with_the_history_cache_are_the_defined_hashes(turns, salt, repeat, bc):
    """The text key of a chat, its history's blocks from TextBlockHasher's chunk cache, equals the definition over the
    messages' compact JSON (non-ASCII and escapes included), whether the chunks were cached or not; the cache holds
    only chunks that lie wholly before the last message, never more than its bound."""
    hasher = PromptHasher(_no_info, text_block_chars=bc)
    hasher.text.max_chunks = 6
    roles = ("system", "user")
    messages = [{"role": roles[i % 2], "content": words(s, n) + ' "é\n'} for i, (s, n) in enumerate(turns)]
    body = {"model": "m", "messages": messages, "cache_salt": salt}
    data = ("[" + ",".join(json.dumps(m, ensure_ascii=False, separators=(",", ":")) for m in messages) + "]").encode()
    history = len(data) - 1 - len(json.dumps(messages[-1], ensure_ascii=False, separators=(",", ":")).encode())
    for _ in range(repeat):
        key = hasher.text.key("chat", body, salt)
        assert key.hashes == _chained(data, salt, bc) and not key.exact
        assert key.block_tokens == bc // 4  # (~4 bytes a token: the policy's minimum match in tokens)
    chunks = history // (bc * hasher.text.chunk_blocks) if history >= hasher.text.min_history else 0
    assert len(hasher.text) == min(6, chunks)


@pytest.mark.parametrize("bc", [64, TEXT_BLOCK_CHARS])
def test_the_history_cache_serves_a_growing_conversation_and_stays_bounded(monkeypatch, bc):
    """Turn after turn a conversation resends its history: its chunks come from the cache (counted: only the blocks
    after the last whole chunk of the history are digested one by one again), and the entries stay within the bound."""
    hasher = PromptHasher(_no_info, text_block_chars=bc).text
    digests = [0]
    plain = xxhash.xxh3_64_intdigest

    def counting(data, seed=0):  # type: ignore[no-untyped-def]
        digests[0] += 1
        return plain(data, seed)

    messages = [{"role": "system", "content": words(0, 400)}]
    chunk = bc * hasher.chunk_blocks
    for turn in range(6):
        messages.append({"role": "user", "content": words(100 * turn, 120)})
        data = json.dumps(messages, ensure_ascii=False, separators=(",", ":")).encode()
        hasher.key("chat", {"messages": messages}, "")  # the new chunks of this turn's history go in
        last = json.dumps(messages[-1], ensure_ascii=False, separators=(",", ":")).encode()
        history = len(data) - 1 - len(last)
        cached_blocks = history // chunk * hasher.chunk_blocks if history >= hasher.min_history else 0
        with monkeypatch.context() as m:
            m.setattr(xxhash, "xxh3_64_intdigest", counting)
            digests[0] = 0
            hashes = hasher.key("chat", {"messages": messages}, "").hashes
        assert hashes == _chained(data, "", bc) and cached_blocks * bc >= 512 * turn
        assert digests[0] == len(hashes) - cached_blocks  # (the root's digest is cached too)
    assert 0 < len(hasher) <= hasher.max_chunks
    hasher.max_chunks = 3
    for i in range(10):
        hasher.key("chat", {"messages": [{"role": "system", "content": words(7 * i, 600)}, messages[-1]]}, "")
    assert len(hasher) == 3


async def _no_info(model: str):  # type: ignore[no-untyped-def]
    return None
