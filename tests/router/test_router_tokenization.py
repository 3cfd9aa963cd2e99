"""The router's prompt -> block hashes agree with what the engine computes from the same request."""

from __future__ import annotations

from router_fake_engine import word_tokenizer_info, words

from kubellm.block_hash import hash_blocks
from kubellm.prompt import PromptRenderer
from kubellm.router.tokenization import PromptHasher, prompt_token_ids, text_block_hashes

R = PromptRenderer(word_tokenizer_info())


def test_chat_matches_the_template_and_joins_content_parts():
    msgs = [{"role": "system", "content": words(0, 40)}, {"role": "user", "content": words(100, 10)}]
    expected = R.chat_token_ids(msgs)
    assert prompt_token_ids(R, "chat", {"messages": msgs}) == expected
    parts = [msgs[0], {"role": "user", "content": [{"type": "text", "text": words(100, 10)}]}]
    assert prompt_token_ids(R, "chat", {"messages": parts}) == expected
    no_gen = prompt_token_ids(R, "chat", {"messages": msgs, "add_generation_prompt": False})
    assert no_gen == R.chat_token_ids(msgs, add_generation_prompt=False)


def test_completion_prompt_forms():
    text = words(5, 50)
    assert prompt_token_ids(R, "completion", {"prompt": text}) == R.encode(text)
    assert prompt_token_ids(R, "completion", {"prompt": [text, "w1"]}) == R.encode(text)
    assert prompt_token_ids(R, "completion", {"prompt": [1, 2, 3]}) == [1, 2, 3]
    assert prompt_token_ids(R, "completion", {"prompt": None}) is None


async def test_hasher_uses_salt_block_size_and_falls_back_to_text():
    async def fetch(model):
        return word_tokenizer_info() if model == "m" else None

    h = PromptHasher(fetch)
    body = {"prompt": words(0, 64)}
    key = await h.key("m", "completion", body)
    assert key.exact and key.hashes == hash_blocks(R.encode(words(0, 64)), 16)
    salted = await h.key("m", "completion", {**body, "cache_salt": "tenant-a"})
    assert salted.hashes == hash_blocks(R.encode(words(0, 64)), 16, "tenant-a") != key.hashes
    h.block_sizes["m"] = 32
    assert len((await h.key("m", "completion", body)).hashes) == 2
    fallback = await h.key("other", "completion", body)
    assert not fallback.exact and fallback.hashes == text_block_hashes(words(0, 64))
    big = {"prompt": words(0, 8000)}  # long prompts are tokenized off the event loop, same result
    assert (await h.key("m", "completion", big)).hashes == hash_blocks(R.encode(words(0, 8000)), 32)
