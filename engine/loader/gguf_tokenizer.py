"""Build a `tokenizers` tokenizer.json from GGUF tokenizer metadata (vocab, merges or scores, token types).

Byte-level BPE files ("gpt2" model) must tokenize exactly as transformers' GGUF tokenizer does, since that is
the reference the engine is checked against and what users get from `AutoTokenizer.from_pretrained(dir,
gguf_file=...)`:
- Llama-family files with a gpt2 (byte-level BPE) vocabulary: GPT-2 byte-level pre-tokenization, BPE with
  byte fallback, control tokens (token type 3) as special tokens, no BOS added by the post-processor.
- Qwen2/Qwen3 files: Qwen's split regex, NFC normalisation, then byte-level BPE.

SentencePiece files ("llama" model: pieces with scores and types, no merges; Gemma 3) must tokenize as
SentencePiece's BPE does (llama.cpp's tokenizer follows it too): user-defined pieces are cut out of the text
first and never merged; the rest, spaces written as U+2581, starts as characters and repeatedly merges the
adjacent pair whose concatenation is the highest-scoring piece (leftmost on ties); characters outside the
vocabulary become <0xXX> byte pieces. A `tokenizers` BPE whose merges are every split (a, b) of every normal
piece a+b, ranked by that piece's score, performs the same merges. (transformers' GGUF converter instead builds
a Unigram model over those scores, which segments differently: "Hello world" -> Hello ▁w or ld, where
SentencePiece gives Hello ▁world; tests/engine/test_gemma3_tokenizer.py checks ours against the sentencepiece
library itself, run on a model rebuilt from the same GGUF vocabulary.) Control pieces (<bos>,
<start_of_turn>, ...) are special tokens matched in text, as transformers matches them. Files that ask for
SentencePiece's dummy space prefix (Llama 2 style) are refused for now.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from .errors import ModelLoadError

TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6
SPIECE_SPACE = "\u2581"  # SentencePiece's visible space
# Gemma's chat turn format (the GGUF of the base model carries no template): a system message opens the first
# user turn, the assistant's role is "model", and a generation prompt opens a model turn.
GEMMA_CHAT_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(system='') -%}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set ns.system = messages[0]['content'] if messages[0]['content'] is string
      else messages[0]['content'] | map(attribute='text') | join('') -%}
  {%- set messages = messages[1:] -%}
{%- endif -%}
{%- for message in messages -%}
  {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
    {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
  {%- endif -%}
  {%- set content = message['content'] if message['content'] is string
      else message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}
  {{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}
  {{- (ns.system + '\n\n' if loop.first and ns.system else '') + content | trim + '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}
"""
# Qwen2's pre-tokenizer split (contractions, letter runs, single digits, punctuation, newlines, spaces).
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


@dataclass
class GGUFVocab:
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE), "llama" (sentencepiece), ...
    tokens: list[str]
    merges: list[str]
    token_types: list[int] = field(default_factory=list)
    unk_token_id: int | None = None
    scores: list[float] = field(default_factory=list)  # sentencepiece piece scores
    add_space_prefix: bool | None = None  # sentencepiece's dummy prefix; None: absent (llama.cpp's default: true)


def build_tokenizer_json(vocab: GGUFVocab, arch: str, source: str) -> str:
    """tokenizer.json text for a GGUF vocabulary; `arch` is general.architecture, `source` names the file."""
    if vocab.model == "llama":
        return sentencepiece_bpe(vocab, source).to_str()
    if vocab.model != "gpt2":
        raise ModelLoadError(
            f"{source}: GGUF tokenizer model {vocab.model!r} is not supported yet "
            "(supported: byte-level BPE 'gpt2', SentencePiece BPE 'llama')"
        )
    if not vocab.merges:
        raise ModelLoadError(f"{source}: GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")
    ids = {tok: i for i, tok in enumerate(vocab.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in vocab.merges]
    tokenizer = _qwen2_style(ids, merges) if arch.startswith("qwen") else _gpt2_style(ids, merges, vocab)
    types = vocab.token_types or [1] * len(vocab.tokens)
    special = [vocab.tokens[i] for i, t in enumerate(types) if t == TOKEN_TYPE_CONTROL]
    user = [vocab.tokens[i] for i, t in enumerate(types) if t == TOKEN_TYPE_USER_DEFINED]
    if special:
        tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    if user:
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return tokenizer.to_str()


def _gpt2_style(ids: dict[str, int], merges: list[tuple[str, ...]], vocab: GGUFVocab) -> Tokenizer:
    unk = vocab.tokens[vocab.unk_token_id] if vocab.unk_token_id is not None else None
    tokenizer = Tokenizer(BPE(ids, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
    tokenizer.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("\u2581", " "), decoders.ByteLevel()]
    )
    tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")
    return tokenizer


def _qwen2_style(ids: dict[str, int], merges: list[tuple[str, ...]]) -> Tokenizer:
    tokenizer = Tokenizer(
        BPE(ids, merges, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def sentencepiece_bpe(vocab: GGUFVocab, source: str) -> Tokenizer:
    """SentencePiece BPE (see the module docstring) as a `tokenizers` BPE with byte fallback."""
    tokens, scores = vocab.tokens, vocab.scores
    types = vocab.token_types or [TOKEN_TYPE_NORMAL] * len(tokens)
    if len(scores) != len(tokens) or len(types) != len(tokens):
        raise ModelLoadError(
            f"{source}: SentencePiece vocabulary needs one score and type per token "
            f"({len(tokens)} tokens, {len(scores)} scores, {len(types)} types)"
        )
    if TOKEN_TYPE_UNUSED in types:
        raise ModelLoadError(f"{source}: SentencePiece vocabularies with unused pieces (type 5) are not supported")
    if vocab.add_space_prefix is None or vocab.add_space_prefix:
        # Llama 2-style files: SentencePiece's dummy prefix interacts with special and user-defined pieces in ways
        # we have no reference for here; refused rather than tokenized approximately.
        raise ModelLoadError(
            f"{source}: SentencePiece tokenizers with a space prefix (tokenizer.ggml.add_space_prefix true or absent,"
            " as in Llama 2 GGUFs) are not supported yet; Gemma-style files (add_space_prefix false) are"
        )
    # llama.cpp's converter writes user-defined pieces with real spaces; SentencePiece matched them as U+2581 runs
    pieces = [
        t.replace(" ", SPIECE_SPACE) if ty == TOKEN_TYPE_USER_DEFINED else t
        for t, ty in zip(tokens, types, strict=True)
    ]
    ids: dict[str, int] = {}
    for i, piece in enumerate(pieces):
        ids.setdefault(piece, i)
    normal = {p for p, ty in zip(pieces, types, strict=True) if ty == TOKEN_TYPE_NORMAL}
    # A merge can join any two current symbols: normal pieces, or single characters in the vocabulary.
    symbols = normal | {p for p in ids if len(p) == 1}
    ranked = sorted((i for i, ty in enumerate(types) if ty == TOKEN_TYPE_NORMAL), key=lambda i: (-scores[i], i))
    score = {p: scores[i] for p, i in ids.items()}
    merges: list[tuple[str, str]] = []
    for i in ranked:
        piece = pieces[i]
        valid = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in symbols and piece[k:] in symbols]
        if len(valid) > 1:  # several ways to the same piece: try the better-scoring parts first
            valid.sort(key=lambda ab: (-score[ab[0]], -score[ab[1]]))
        merges.extend(valid)
    unk = vocab.unk_token_id
    unk_token = tokens[unk] if unk is not None and 0 <= unk < len(tokens) else None
    tokenizer = Tokenizer(BPE(ids, merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", SPIECE_SPACE)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")
    special = [tokens[i] for i, t in enumerate(types) if t in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN)]
    user = [pieces[i] for i, t in enumerate(types) if t == TOKEN_TYPE_USER_DEFINED]
    if special:
        tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    if user:  # matched in the normalized text (spaces already U+2581), as SentencePiece matches them
        tokenizer.add_tokens([AddedToken(t, normalized=True, special=False) for t in user])
    return tokenizer
