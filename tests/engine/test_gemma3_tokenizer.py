"""Gemma 3's tokenizer, built from its GGUF vocabulary (SentencePiece pieces with scores and types), tokenizes as
SentencePiece itself does, decodes back to the text, matches special tokens, and renders Gemma's chat turns.

The reference is the `sentencepiece` library running a model rebuilt from the same GGUF vocabulary (BPE, byte
fallback, identity normalisation, no dummy prefix: Gemma 3's settings). transformers is not the reference here:
its GGUF converter turns this vocabulary into a Unigram model, which segments differently ("Hello world" ->
Hello ▁w or ld instead of Hello ▁world; llama.cpp and SentencePiece agree with us)."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer

from kubellm.engine.loader import ModelLoadError, load_model
from kubellm.engine.loader.gguf_reader import GGUFFile
from kubellm.engine.loader.gguf_tokenizer import GGUFVocab, sentencepiece_bpe
from kubellm.prompt import PromptRenderer

SPECIAL_MARKERS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<unused", "<start_of_", "<end_of_", "[multimodal]")


@pytest.fixture(scope="module")
def gemma3_path():
    from kubellm.builtin_models import GEMMA3_270M, builtin_model_path

    return builtin_model_path(GEMMA3_270M)


@pytest.fixture(scope="module")
def renderer(gemma3_path) -> PromptRenderer:
    return PromptRenderer(load_model(gemma3_path, load_weights=False).tokenizer_info)


@pytest.fixture(scope="module")
def sentencepiece_reference(gemma3_path):
    """sentencepiece's own BPE encoder over the GGUF vocabulary (the pieces llama.cpp wrote with spaces go back to
    U+2581, <unk> becomes the model's unknown piece)."""
    import sentencepiece as spm  # a test dependency (pyproject's test extra): missing, the test fails
    from sentencepiece import sentencepiece_model_pb2 as pb

    fields = GGUFFile(gemma3_path).fields
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_space_prefix"] is False
    unk = fields["tokenizer.ggml.unknown_token_id"]
    proto = pb.ModelProto()
    for i, (piece, score, kind) in enumerate(
        zip(
            fields["tokenizer.ggml.tokens"],
            fields["tokenizer.ggml.scores"],
            fields["tokenizer.ggml.token_type"],
            strict=True,
        )
    ):
        p = proto.pieces.add()
        p.piece = piece.replace(" ", "\u2581") if kind == 4 else piece
        p.score = score
        p.type = pb.ModelProto.SentencePiece.UNKNOWN if i == unk else kind  # GGUF uses sentencepiece's numbering
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = len(proto.pieces)
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id = unk, 2, 1
    proto.trainer_spec.pad_id = 0
    ns = proto.normalizer_spec
    ns.name, ns.add_dummy_prefix, ns.remove_extra_whitespaces, ns.escape_whitespaces = "identity", False, False, True
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


FIXED = [
    "Hello world",
    "The capital of France is Paris.",
    "",
    " ",
    "a",
    "  two leading spaces",
    "trailing spaces   ",
    "a  b   c    d     e" + " " * 40 + "f",
    "tabs\tand\t\ttabs\t\t\t\t",
    "new\nlines\n\n\nmany\n\n\n\n\n\n\n\n\n\n",
    "mixed \r\n CRLF \r\n\r\n",
    "numbers 0 7 42 1234567890 3.14159 -2e10 1,000,000 2024-11-29 12:34:56",
    "emoji 😀🎉👍🏽 👨‍👩‍👧‍👦 🤖",
    "日本語のテキスト、中文文本，한국어 텍스트, ภาษาไทย, हिन्दी, العربية, עברית",
    "Ünïcödé çàfé naïve Ωμέγα Ж щ ǅ ﬁ ligature",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math ∑∫∂√ ≈ ≠ ≤",
    "combining e\u0301 and zero\u200bwidth\u200djoiner \ufeffBOM",
    "control \x00\x01\x07\x1b chars",
    "private use \ue000\U000f0000 and unassigned \u0e00\u0378",
    "<table><tr><td>cell</td></tr></table> <h1>title</h1> <b>bold</b>",
    "code:\n    def f(x):\n        return x ** 2  # square\n\tindented\n",
    "x" * 500,
    "don't won't can't I'm you're y'all",
    "https://example.com/path?q=1&b=2#frag user@example.org",
    "\u2581 literal U+2581 \u2581\u2581 pieces",
]


def _random_texts(vocab: list[str], types: list[int]) -> list[str]:
    rng = random.Random(29)
    alphabet = list(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789  \n\t.,;:!?-_()[]{}<>'\"/\\|@#$%^&*+=~`"
    )
    alphabet += list("éüßøåñçλπΩжщ中文日本語한국🙂🚀€£¥ǅﬁ\u200d\u0301\u0378\U0002a6d6")  # last two: byte fallback
    normal = [t.replace("\u2581", " ") for t, k in zip(vocab, types, strict=True) if k == 1]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 100))) for _ in range(600)]
    for _ in range(600):  # runs of real pieces, glued or separated by whitespace, sometimes cut mid-piece
        parts = [rng.choice(normal) + rng.choice(["", "", " ", "  ", "\n", "\t"]) for _ in range(rng.randrange(1, 16))]
        text = "".join(parts)
        texts.append(text[rng.randrange(0, len(text)) :] if rng.random() < 0.3 else text)
    return [t for t in texts if not any(m in t for m in SPECIAL_MARKERS)]


def test_tokenizes_as_sentencepiece(renderer, sentencepiece_reference, gemma3_path):
    fields = GGUFFile(gemma3_path).fields
    texts = FIXED + _random_texts(fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"])
    tok = renderer.tokenizer
    mismatches = []
    for text in texts:
        ours = tok.encode(text, add_special_tokens=False).ids
        if ours != sentencepiece_reference.encode(text):
            mismatches.append(text)
    assert not mismatches, f"{len(mismatches)} of {len(texts)} texts differ, e.g. {mismatches[:3]!r}"
    assert len(texts) > 1000


def test_known_ids_and_round_trip(renderer):
    tok = renderer.tokenizer
    assert tok.encode("Hello world", add_special_tokens=False).tokens == ["Hello", "\u2581world"]
    assert renderer.encode("Hello world") == [2, 9259, 1902]  # add_bos_token: <bos> first
    for text in FIXED:
        if "\u2581" not in text:  # SentencePiece writes spaces as U+2581, so literal ones come back as spaces
            assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text, repr(text)


def test_whitespace_and_markup_pieces_are_whole_tokens(renderer):
    """Gemma's user-defined pieces (newline runs, space runs, HTML tags) are cut out before merging."""
    tok = renderer.tokenizer
    assert tok.encode("a\n\n\nb", add_special_tokens=False).tokens == ["a", "\n\n\n", "b"]
    assert tok.encode("a    b", add_special_tokens=False).ids[1] == tok.token_to_id("\u2581\u2581\u2581\u2581")
    assert tok.encode("<table>x", add_special_tokens=False).tokens[0] == "<table>"


def test_characters_outside_the_vocabulary_fall_back_to_bytes(renderer):
    tok = renderer.tokenizer
    char = "\U0002a6d6"  # a rare CJK ideograph (4 UTF-8 bytes): no piece holds it
    assert tok.token_to_id(char) is None
    ids = tok.encode(char, add_special_tokens=False).ids
    assert [tok.id_to_token(i) for i in ids] == [f"<0x{b:02X}>" for b in char.encode()]
    assert tok.decode(ids) == char


def test_special_tokens_and_chat_template(renderer):
    """Control pieces written in text are special tokens (as transformers treats them); the GGUF has no chat
    template, so Gemma's turn format applies, with <end_of_turn> ending generation."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": [{"type": "text", "text": "And of Italy?"}]},
    ]
    text = renderer.render_chat(messages)
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nWhat is the capital of France?<end_of_turn>\n"
        "<start_of_turn>model\nParis.<end_of_turn>\n<start_of_turn>user\nAnd of Italy?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    ids = renderer.chat_token_ids([{"role": "user", "content": "What is the capital of France?"}])
    # Gemma 3's well-known ids: <bos>=2 <start_of_turn>=105 user=2364 \n=107 ... <end_of_turn>=106 model=4368
    assert ids == [2, 105, 2364, 107, 3689, 563, 506, 5279, 529, 7001, 236881, 106, 107, 105, 4368, 107]
    assert renderer.decode(ids) == "user\nWhat is the capital of France?\nmodel\n"
    with pytest.raises(ValueError, match="alternate"):
        renderer.render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_space_prefix_vocabularies_are_refused():
    vocab = GGUFVocab(model="llama", tokens=["<unk>", "a"], merges=[], token_types=[2, 1], scores=[0.0, -1.0])
    with pytest.raises(ModelLoadError, match="space prefix"):
        sentencepiece_bpe(vocab, "llama2.gguf")
    vocab.add_space_prefix = False
    assert Tokenizer.from_str(sentencepiece_bpe(vocab, "x").to_str()).encode("aa").tokens == ["a", "a"]
