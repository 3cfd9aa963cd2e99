"""Our tokenizer built from GGUF metadata tokenizes (and decodes) exactly as transformers' GGUF tokenizer."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer

from kubellm.prompt import PromptRenderer

TEXTS = [
    "Hello world",
    "What is the capital of France?",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\t\ttabs\nnewlines\n\n\nand \r\n windows line ends",
    "Numbers: 0 7 42 1234567890 3.14159 -2.5e-10 1,000,000 2024-06-01 0x1F",
    "Unicode: café naïve résumé Straße Ωμέγα Привет мир 你好，世界 こんにちは 안녕하세요 مرحبا שלום",
    "Combining: e\u0301 a\u0308 n\u0303; NFC vs NFD: \u00e9 e\u0301",
    "Emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🤖 ✨",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    '{"key": [1, 2, {"nested": null}], "s": "a\\"b"}  // <html><body class="x">&amp;</body></html>',
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>between<repo_name>specials<file_sep>",
    "I'm you're it's we'll they'd she's I've DON'T",
    "mixed  double  spaces    and\u00a0nbsp\u2003em-space\u200bzero-width",
    "",
    " ",
    "\n",
    "a" * 300,
    "🙂" * 5 + "\x00\x01\x7f control chars",
]


@pytest.fixture(scope="module")
def ours(smollm2_loaded) -> Tokenizer:
    return Tokenizer.from_str(smollm2_loaded.tokenizer_info.tokenizer_json)


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_ids_and_decode_equal_transformers(ours, smollm2_hf_tokenizer, text):
    ref = smollm2_hf_tokenizer(text).input_ids
    assert ours.encode(text).ids == ref
    assert ours.decode(ref, skip_special_tokens=False) == smollm2_hf_tokenizer.decode(ref, skip_special_tokens=False)
    assert ours.decode(ref, skip_special_tokens=True) == smollm2_hf_tokenizer.decode(ref, skip_special_tokens=True)


def test_random_text_fuzz(ours, smollm2_hf_tokenizer):
    rng = random.Random(0)
    pool = list("abcxyzABCXYZ0123456789 \t\n.,;:!?'\"()[]{}<>/\\|-_=+*&^%$#@~`") + list("éßΩжд你好🙂👍🏽\u200b\u00a0")
    pool += ["<|im_start|>", "<|im_end|>", "  ", "\n\n", "'s", "http://", "1234"]
    for _ in range(150):
        text = "".join(rng.choice(pool) for _ in range(rng.randrange(1, 60)))
        assert ours.encode(text).ids == smollm2_hf_tokenizer(text).input_ids, repr(text)


def test_tokenizer_info_specials(smollm2_loaded):
    info = smollm2_loaded.tokenizer_info
    assert (info.bos_token, info.eos_token, info.add_bos_token) == ("<|im_start|>", "<|im_end|>", False)
    assert info.chat_template and "<|im_start|>" in info.chat_template
    assert info.model_max_length == 8192
    renderer = PromptRenderer(info)
    assert (renderer.bos_token_id, renderer.eos_token_id) == (1, 2)
    assert renderer.encode("<|im_end|>") == [2]
