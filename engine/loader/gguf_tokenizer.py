"""Build a `tokenizers` tokenizer.json from GGUF tokenizer metadata (BPE vocab, merges, token types).

The result must tokenize exactly as transformers' GGUF tokenizer does, since that is the reference the engine
is checked against and what users get from `AutoTokenizer.from_pretrained(dir, gguf_file=...)`:
- Llama-family files with a gpt2 (byte-level BPE) vocabulary: GPT-2 byte-level pre-tokenization, BPE with
  byte fallback, control tokens (token type 3) as special tokens, no BOS added by the post-processor.
- Qwen2/Qwen3 files: Qwen's split regex, NFC normalisation, then byte-level BPE.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from .errors import ModelLoadError

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
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


def build_tokenizer_json(vocab: GGUFVocab, arch: str, source: str) -> str:
    """tokenizer.json text for a GGUF vocabulary; `arch` is general.architecture, `source` names the file."""
    if vocab.model != "gpt2":
        raise ModelLoadError(
            f"{source}: GGUF tokenizer model {vocab.model!r} is not supported yet (only byte-level BPE 'gpt2')"
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
