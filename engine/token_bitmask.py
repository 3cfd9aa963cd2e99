"""Applying a step's grammar bitmask to its logits: disallowed tokens get -inf, in place, on the logits' device.

On CUDA one Triton kernel touches only the constrained rows and writes only the disallowed entries (the words
are copied from pinned memory without waiting for the stream); without Triton a few torch ops do the same; on a
CPU numpy unpacks the bits and one masked fill applies them. The
logits are the LM head's output, outside any CUDA graph, so masking never changes what a graph captured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kubellm.engine.transfer import to_device_async

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs
    triton = None
    tl = None

BLOCK = 4096  # vocabulary entries per program


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


@dataclass
class TokenBitmask:
    """Allowed tokens of some rows of a batch: `words[j]` (int32, bit t % 32 of word t // 32) is row `rows[j]`'s."""

    rows: list[int]
    words: np.ndarray  # int32 [len(rows), words]
    pinned: torch.Tensor | None = None  # `words`' own memory as a pinned tensor (PinnedBitmaskBuffers): copied as is

    def allowed(self, j: int, vocab_size: int) -> np.ndarray:
        """Row j's allowed token ids (tests and debugging)."""
        bits = np.unpackbits(self.words[j].view(np.uint8), bitorder="little")[:vocab_size]
        return np.nonzero(bits)[0]


class PinnedBitmaskBuffers:
    """Pinned host memory that a step's bitmask is filled into, so its copy to the GPU needs no staging copy
    (to_device_async pins pageable memory by copying it). `slots` buffers taken in turn: a buffer is filled again
    only `slots` bitmasks later, after the step that copied it has sampled and its tokens were read back (the engine
    reads the previous step's tokens before it builds a bitmask), so its copy is done. Grows to the largest batch."""

    def __init__(self, words: int, slots: int = 2):
        self.words = words
        self._buffers: list[torch.Tensor | None] = [None] * slots
        self._next = 0

    def take(self, rows: int) -> tuple[np.ndarray, torch.Tensor]:
        """The next buffer's first `rows` rows: a numpy view to fill and the pinned tensor of the same memory."""
        slot = self._next
        self._next = (slot + 1) % len(self._buffers)
        buf = self._buffers[slot]
        if buf is None or buf.shape[0] < rows:
            capacity = max(rows, 2 * buf.shape[0] if buf is not None else 64)
            buf = torch.empty((capacity, self.words), dtype=torch.int32, pin_memory=True)
            self._buffers[slot] = buf
        view = buf[:rows]
        return view.numpy(), view


@torch.inference_mode()  # the model runner's logits are inference tensors
def apply_token_bitmask(logits: torch.Tensor, mask: TokenBitmask) -> None:
    """Set logits[rows[j], t] = -inf for every token t that row j's words disallow (in place). Tokens past the
    words' end are disallowed too (a vocabulary larger than the bitmask's)."""
    if not mask.rows:
        return
    vocab = logits.shape[1]
    width = mask.words.shape[1]
    if width * 32 < vocab:
        raise ValueError(f"a bitmask of {width} words cannot cover a vocabulary of {vocab}")
    if logits.is_cuda and triton is not None and logits.stride(1) == 1:
        rows = to_device_async(mask.rows, torch.int64, logits.device)
        words = to_device_async(mask.pinned if mask.pinned is not None else mask.words, torch.int32, logits.device)
        mask_on_device(logits, rows, words)
        return
    if not logits.is_cuda:  # numpy unpacks bits ~50x faster than torch's shift-and-mask on a CPU
        bits = np.unpackbits(np.ascontiguousarray(mask.words).view(np.uint8), axis=1, count=vocab, bitorder="little")
        forbidden = torch.from_numpy(bits.view(np.bool_)).logical_not_()
        if mask.rows == list(range(logits.shape[0])):
            logits.masked_fill_(forbidden, float("-inf"))
        else:
            rows = torch.tensor(mask.rows, dtype=torch.int64)
            logits[rows] = logits[rows].masked_fill_(forbidden, float("-inf"))
        return
    rows = to_device_async(mask.rows, torch.int64, logits.device)
    words = to_device_async(mask.words, torch.int32, logits.device)
    logits[rows] = logits[rows].masked_fill(~unpack_bitmask(words, vocab), float("-inf"))


def mask_on_device(logits: torch.Tensor, rows: torch.Tensor, words: torch.Tensor) -> None:
    """The Triton launch: logits [B, V] (rows contiguous), rows int64 [R] and words int32 [R, W] on its device."""
    vocab = logits.shape[1]
    grid = (rows.shape[0], triton.cdiv(vocab, BLOCK))
    _mask_kernel[grid](logits, logits.stride(0), rows, words, words.shape[1], vocab, BLOCK=BLOCK)


def unpack_bitmask(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Bool [rows, vocab_size]: True where allowed."""
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(words.shape[0], -1)[:, :vocab_size].bool()


if triton is not None:

    @triton.jit
    def _mask_kernel(logits_ptr, stride, rows_ptr, words_ptr, width, vocab, BLOCK: tl.constexpr):
        """Program (j, block): vocabulary entries [block * BLOCK, +BLOCK) of row rows[j]."""
        j = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        row = tl.load(rows_ptr + j)
        in_vocab = cols < vocab
        word = tl.load(words_ptr + j * width + cols // 32, mask=in_vocab, other=-1)
        forbidden = ((word >> (cols % 32)) & 1) == 0
        minus_inf = tl.full([BLOCK], float("-inf"), tl.float32)
        tl.store(logits_ptr + row * stride + cols, minus_inf, mask=in_vocab & forbidden)
