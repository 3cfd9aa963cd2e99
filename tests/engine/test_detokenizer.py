"""IncrementalDetokenizer against full decodes, on a byte-level BPE (GPT-2/SmolLM2 style) and a
SentencePiece-style tokenizer with byte fallback (Llama-2 style), both built here from the tokenizers library."""

from __future__ import annotations

import random
import string

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from kubellm.engine.detokenizer import IncrementalDetokenizer

FFFD = "\ufffd"
TEXTS = [
    "héllo wörld 日本語 🙂",
    "hello world, the quick brown fox jumps over the lazy dog",
    "stop here. END of text",
    "日本語のテキスト 🙂🙂 naïve café",
    "🙂🙂 日本",
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable char map, which ByteLevel tokenizers use for their byte tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330,
        special_tokens=["<|endoftext|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS * 5, trainer)
    return tok


@pytest.fixture(scope="module")
def sentencepiece_like() -> Tokenizer:
    """Metaspace-style pieces with <0xXX> byte fallback and a decoder that strips the first leading space."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in ["▁", *string.ascii_letters, *string.digits, *string.punctuation]:
        vocab.setdefault(ch, len(vocab))
    merges = []
    for word in ["▁hello", "▁world", "▁the", "▁end", "▁stop"]:
        for i in range(2, len(word) + 1):
            if word[:i] not in vocab:
                vocab[word[:i]] = len(vocab)
                merges.append((word[: i - 1], word[i - 1]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tok


def byte_ids(tok: Tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte: the worst case for split characters."""
    b2u = _bytes_to_unicode()
    return [tok.token_to_id(b2u[b]) for b in text.encode()]


def mixed_ids(tok: Tokenizer, text: str, rng: random.Random) -> list[int]:
    """Random segments, each either BPE-encoded or spelled byte by byte."""
    ids: list[int] = []
    i = 0
    while i < len(text):
        j = min(len(text), i + rng.randint(1, 6))
        seg = text[i:j]
        ids += byte_ids(tok, seg) if rng.random() < 0.5 else tok.encode(seg).ids
        i = j
    return ids


def stream(detok: IncrementalDetokenizer, ids: list[int], finish: bool = True) -> list[str]:
    deltas = [detok.add_token(t).text_delta for t in ids]
    if finish:
        deltas.append(detok.finish().text_delta)
    return deltas


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("spelling", ["bpe", "bytes"])
def test_deltas_concatenate_to_full_decode_without_replacement_chars(bpe, text, spelling):
    ids = bpe.encode(text).ids if spelling == "bpe" else byte_ids(bpe, text)
    assert bpe.decode(ids) == text
    prompt = bpe.encode("the quick ").ids
    detok = IncrementalDetokenizer(bpe, prompt)
    deltas = stream(detok, ids)
    assert "".join(deltas) == text == detok.output_text
    assert not any(FFFD in d for d in deltas)


def test_multibyte_character_emitted_once_complete(bpe):
    detok = IncrementalDetokenizer(bpe, [])
    ids = byte_ids(bpe, "a🙂")
    assert [detok.add_token(t).text_delta for t in ids] == ["a", "", "", "", "🙂"]


def test_bpe_tokens_that_cross_character_boundaries(bpe):
    # "のテキスト" comes out as a chain of tokens that each end inside a character ("®ãĥ" = end of の +
    # start of テ), so no token boundary in the chain is a character boundary.
    text = "日本語のテキスト 🙂 naïve"
    ids = bpe.encode(text).ids
    pieces = [bpe.decode([t]) for t in ids]
    assert sum(FFFD in p for p in pieces) >= 4  # the tokenizer really splits characters across tokens
    detok = IncrementalDetokenizer(bpe, [])
    deltas = stream(detok, ids)
    assert "".join(deltas) == text
    assert not any(FFFD in d for d in deltas)
    assert deltas[1:7] == ["", "の", "テ", "キ", "ス", "ト"]  # each character released as soon as it completes


def test_random_tokenizations_match_full_decode(bpe):
    rng = random.Random(0)
    alphabet = [*"ab cdé日本語🙂.,\n", "hello", " world"]
    for _ in range(100):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        ids = mixed_ids(bpe, text, rng)
        prompt = mixed_ids(bpe, "日本 hello", rng)
        deltas = stream(IncrementalDetokenizer(bpe, prompt), ids)
        assert "".join(deltas) == text
        assert not any(FFFD in d for d in deltas)


def test_incomplete_character_at_the_end_is_flushed_as_a_full_decode_shows_it(bpe):
    ids = byte_ids(bpe, "ok🙂")[:-1]
    detok = IncrementalDetokenizer(bpe, [])
    assert "".join(detok.add_token(t).text_delta for t in ids) == "ok"
    assert detok.finish().text_delta == bpe.decode(ids)[2:]
    assert detok.output_text == bpe.decode(ids)


def test_invalid_bytes_are_not_withheld_forever(bpe):
    lone_continuation = byte_ids(bpe, "é")[1:]  # a continuation byte with no lead byte
    ids = lone_continuation + byte_ids(bpe, "ab")
    deltas = stream(IncrementalDetokenizer(bpe, []), ids, finish=False)
    assert "".join(deltas) == bpe.decode(ids) == FFFD + "ab"


def test_sentencepiece_spacing_and_byte_fallback(sentencepiece_like):
    tok = sentencepiece_like
    prompt = tok.encode("the end").ids
    out = tok.encode("hello world 日本 🙂 stop").ids[0:]
    full = tok.decode(prompt + out)
    expected = full[len(tok.decode(prompt)) :]
    assert expected == " hello world 日本 🙂 stop"  # the first token keeps its space after a prompt
    deltas = stream(IncrementalDetokenizer(tok, prompt), out)
    assert "".join(deltas) == expected
    assert not any(FFFD in d for d in deltas)
    # Without a prompt the decoder strips the leading space, as a plain decode does.
    assert "".join(stream(IncrementalDetokenizer(tok, []), out)) == tok.decode(out)


def _check_stop_stream(tok, ids, stop, include, expected_text, expected_stop, min_tokens=0):
    detok = IncrementalDetokenizer(tok, [], stop=stop, include_stop_str_in_output=include, min_tokens=min_tokens)
    seen = ""
    got_stop = None
    for t in ids:
        update = detok.add_token(t)
        seen += update.text_delta
        assert expected_text.startswith(seen), f"streamed {seen!r}, which the final text {expected_text!r} cuts"
        if update.stop_string is not None:
            got_stop = update.stop_string
            break
    seen += detok.finish().text_delta
    assert seen == detok.output_text == expected_text
    assert got_stop == detok.stop_string == expected_stop


@pytest.mark.parametrize("spelling", ["bpe", "bytes"])
def test_stop_string_spanning_tokens(bpe, spelling):
    text = "hello world, the quick brown fox"
    ids = bpe.encode(text).ids if spelling == "bpe" else byte_ids(bpe, text)
    _check_stop_stream(bpe, ids, ["quick"], False, "hello world, the ", "quick")
    _check_stop_stream(bpe, ids, ["quick"], True, "hello world, the quick", "quick")
    # "the q" is a prefix of the stop seen early ("the quick"): held back, then released when it fails.
    _check_stop_stream(bpe, ids, ["the qx", "fox"], False, "hello world, the quick brown ", "fox")
    _check_stop_stream(bpe, ids, ["absent"], False, text, None)


def test_stop_string_of_multibyte_characters(bpe):
    text = "héllo wörld 日本語 🙂"
    for ids in (bpe.encode(text).ids, byte_ids(bpe, text)):
        _check_stop_stream(bpe, ids, ["本語"], False, "héllo wörld 日", "本語")
        _check_stop_stream(bpe, ids, ["🙂"], True, text, "🙂")


def test_first_completed_stop_wins(bpe):
    ids = byte_ids(bpe, "xabcd")
    _check_stop_stream(bpe, ids, ["abcd", "bc"], False, "xa", "bc")


def test_text_held_for_a_possible_stop_is_released_at_finish(bpe):
    detok = IncrementalDetokenizer(bpe, [], stop=["quick"])
    deltas = [detok.add_token(t).text_delta for t in byte_ids(bpe, "the qui")]
    assert "".join(deltas) == "the "
    assert detok.finish().text_delta == "qui"
    assert detok.output_text == "the qui" and detok.stop_string is None


def test_tokens_after_a_stop_are_ignored(bpe):
    detok = IncrementalDetokenizer(bpe, [], stop=["."])
    stream(detok, byte_ids(bpe, "one. two"), finish=False)
    assert detok.output_text == "one" and detok.stop_string == "."


# One token per character below: token k adds the text's k-th character.
@pytest.mark.parametrize(
    ("min_tokens", "expected"),
    [
        (0, "a"),  # no minimum: the first "." stops
        (1, "a"),  # the "." is token 2, after the minimum
        (2, "a.b"),  # the "." that is token 2 is ordinary text; the next one (token 4) stops
        (3, "a.b"),
        (4, "a.b.c"),
    ],
)
def test_min_tokens_ignores_stop_strings_in_the_first_min_tokens_tokens_and_honours_the_next(bpe, min_tokens, expected):
    _check_stop_stream(bpe, byte_ids(bpe, "a.b.c.d"), ["."], False, expected, ".", min_tokens=min_tokens)
    _check_stop_stream(bpe, byte_ids(bpe, "a.b.c.d"), ["."], True, expected + ".", ".", min_tokens=min_tokens)


def test_min_tokens_covering_every_stop_keeps_the_whole_text(bpe):
    _check_stop_stream(bpe, byte_ids(bpe, "a.b.c"), ["."], False, "a.b.c", None, min_tokens=5)


def test_stop_string_that_begins_within_min_tokens_and_ends_after_stops(bpe):
    # vLLM's rule: a stop counts when it ends in text of a token after the minimum, wherever it begins.
    _check_stop_stream(bpe, byte_ids(bpe, "xaby"), ["ab"], False, "x", "ab", min_tokens=2)
    # Ending inside the minimum's text it is ordinary text, also beside a longer stop that is still possible.
    _check_stop_stream(bpe, byte_ids(bpe, "xabyz"), ["ab", "bzzz"], False, "xabyz", None, min_tokens=3)


def test_tokens_fed_at_once_cut_as_when_fed_one_by_one(bpe):
    ids = byte_ids(bpe, "a.b.c.d")
    for min_tokens in range(6):
        one_by_one = IncrementalDetokenizer(bpe, [], stop=["."], min_tokens=min_tokens)
        stream(one_by_one, ids)
        at_once = IncrementalDetokenizer(bpe, [], stop=["."], min_tokens=min_tokens)
        update = at_once.add_tokens(ids)
        at_once.finish()
        assert (at_once.output_text, at_once.stop_string) == (one_by_one.output_text, one_by_one.stop_string)
        assert update.stop_string == one_by_one.stop_string


def test_special_tokens_count_toward_min_tokens(bpe):
    eot = bpe.token_to_id("<|endoftext|>")
    ids = [eot, *byte_ids(bpe, "a.b.")]  # the skipped special token is output token 1, "a" token 2
    _check_stop_stream(bpe, ids, ["."], False, "a", ".", min_tokens=2)  # so the first "." (token 3) stops


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(bpe, skip):
    eot = bpe.token_to_id("<|endoftext|>")
    ids = [*bpe.encode("hello").ids, eot, *bpe.encode(" world").ids]
    detok = IncrementalDetokenizer(bpe, [bpe.token_to_id("<|im_start|>")], skip_special_tokens=skip)
    text = "".join(stream(detok, ids))
    assert text == ("hello world" if skip else "hello<|endoftext|> world")
    assert text == bpe.decode(ids, skip_special_tokens=skip)


def test_random_stops_match_a_char_by_char_reference(bpe):
    rng = random.Random(1)
    alphabet = list("ab 日🙂.")
    for _ in range(150):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 25)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 2))]
        include = rng.random() < 0.5
        expected, expected_stop = text, None
        for end in range(1, len(text) + 1):  # the first prefix of the text that contains a stop
            found = [(text.find(s, 0, end), s) for s in stops if text.find(s, 0, end) != -1]
            if found:
                idx, s = min(found)
                expected, expected_stop = text[: idx + len(s)] if include else text[:idx], s
                break
        _check_stop_stream(bpe, mixed_ids(bpe, text, rng), stops, include, expected, expected_stop)


def test_random_stops_with_min_tokens_match_a_char_by_char_reference(bpe):
    rng = random.Random(2)
    for _ in range(150):
        text = "".join(rng.choice("ab .") for _ in range(rng.randint(1, 20)))  # one token per character
        stops = ["".join(rng.choice("ab .") for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 2))]
        min_tokens = rng.randint(0, len(text))
        include = rng.random() < 0.5
        expected, expected_stop = text, None
        for end in range(min_tokens + 1, len(text) + 1):  # the first stop to end after the minimum's text
            ending = [(end - len(s), s) for s in stops if end >= len(s) and text[end - len(s) : end] == s]
            if ending:
                idx, s = min(ending)
                expected, expected_stop = text[: idx + len(s)] if include else text[:idx], s
                break
        _check_stop_stream(bpe, byte_ids(bpe, text), stops, include, expected, expected_stop, min_tokens)
