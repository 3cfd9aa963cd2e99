"""The exponential race in one Triton kernel (CUDA): one pass over the logits instead of ~8.

The sampler's race picks argmax_i p_i / E_i with E_i ~ Exponential(1), which draws token i with probability
p_i. In log space that is argmax_i (x_i / T - log E_i) over the (penalised) logits x: no softmax is needed.
Done in torch it costs a softmax, a float64 noise tensor of B x V, its conversion, a clamp, a division and an
argmax — ~2 GB of memory traffic at batch 256 over a 128k vocabulary (0.4-0.5 ms of an H200 decode step).
Here each row streams its logits once; the noise comes from Philox inside the kernel with 53 random bits per
token, so E_i keeps float64 resolution (a token of relative probability 1e-12 still gets its share, as with
the torch path's float64 noise).

The stream is keyed by a seed drawn on the host per call (from the sampler's seeded host generator), so an
engine seed reproduces its draws and no host-device sync is needed.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs
    triton = None
    tl = None

_state = {"ok": triton is not None}
BLOCK = 1024
CHUNKS = 16  # column chunks per row (programs per row)


def configure(on: bool) -> None:
    """The engine's fused_sampler setting (off: torch ops)."""
    _state["ok"] = triton is not None and on


def enabled(x: torch.Tensor) -> bool:
    return _state["ok"] and x.is_cuda


if triton is not None:

    @triton.jit(do_not_specialize=["seed"])  # a new seed every call must not mean a new compilation
    def _race_kernel(
        x_ptr, inv_temp_ptr, best_ptr, best_col_ptr, stride, n_cols, chunk_cols, n_chunks, seed, BLOCK: tl.constexpr
    ):
        """Program (row, chunk): the best score and its column within one chunk of the row's columns."""
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        inv_temp = tl.load(inv_temp_ptr + row)
        lanes = tl.arange(0, BLOCK)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        best_col = tl.zeros([BLOCK], tl.int64)
        first = chunk * chunk_cols
        for start in range(0, chunk_cols, BLOCK):
            cols = first + start + lanes
            mask = (cols < n_cols) & (start + lanes < chunk_cols)
            x = tl.load(x_ptr + row * stride + cols, mask=mask, other=float("-inf")).to(tl.float32)
            # int32 offsets: Philox then yields 32-bit words (64-bit offsets would switch it to 64-bit words)
            r0, r1, _, _ = tl.randint4x(seed, (row * n_cols + cols).to(tl.int32))
            hi = (r0 >> 5).to(tl.float64)  # 27 bits
            lo = (r1 >> 6).to(tl.float64)  # 26 bits
            u = (hi * 67108864.0 + lo + 1.0) * (1.0 / 9007199254740992.0)  # (0, 1] with 53 random bits
            log_e = tl.log(-tl.log(u))  # log of an Exponential(1) draw, float64 near u = 1
            score = tl.where(mask, x * inv_temp - log_e.to(tl.float32), float("-inf"))
            better = score > best
            best = tl.where(better, score, best)
            best_col = tl.where(better, cols.to(tl.int64), best_col)
        lane = tl.argmax(best, axis=0)
        slot = row * n_chunks + chunk
        tl.store(best_ptr + slot, tl.max(best, axis=0))
        tl.store(best_col_ptr + slot, tl.sum(tl.where(lanes == lane, best_col, 0), axis=0))


def race(logits: torch.Tensor, temperatures: torch.Tensor, seed: int) -> torch.Tensor | None:
    """Token ids [B] drawn from softmax(logits / temperature) per row (float32 logits [B, V], temperatures [B]
    on the same device, all > 0); None when the kernel does not apply or failed (the caller falls back).
    Rows are cut into column chunks so a small batch still fills the GPU; a tiny argmax joins the chunks."""
    if logits.dim() != 2 or logits.stride(-1) != 1 or logits.shape[0] == 0:
        return None
    try:
        rows, n_cols = logits.shape
        n_chunks = max(1, min(CHUNKS, triton.cdiv(n_cols, BLOCK)))
        chunk_cols = triton.cdiv(triton.cdiv(n_cols, n_chunks), BLOCK) * BLOCK
        n_chunks = triton.cdiv(n_cols, chunk_cols)
        inv_temp = (1.0 / temperatures.to(torch.float32)).contiguous()
        best = torch.empty((rows, n_chunks), dtype=torch.float32, device=logits.device)
        best_col = torch.empty((rows, n_chunks), dtype=torch.int64, device=logits.device)
        _race_kernel[(rows, n_chunks)](
            logits, inv_temp, best, best_col, logits.stride(0), n_cols, chunk_cols, n_chunks, seed, BLOCK=BLOCK
        )
        return best_col.gather(1, best.argmax(dim=1, keepdim=True)).squeeze(1)
    except Exception as e:  # compile or launch failure: torch path from now on
        _state["ok"] = False
        logger.warning("fused race sampler failed (%s: %s); using torch ops from now on", type(e).__name__, e)
        return None


def warm_up(device: torch.device, vocab_size: int) -> None:
    """Compile the kernel now (start-up), not on the first request."""
    if _state["ok"] and device.type == "cuda":
        race(torch.zeros((1, vocab_size), device=device), torch.ones(1, device=device), seed=1)
