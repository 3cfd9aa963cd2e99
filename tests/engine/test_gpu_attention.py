"""flashinfer backend vs the torch reference backend on the same paged cache (GPU only; skipped without CUDA).

The reference runs in float32 over a float32 copy of the bf16 cache, so the tolerance is flashinfer's bf16
rounding alone. Cases: prefill, chunked prefill over a cached prefix mixed with decodes, and decode (CUDA-core
and tensor-core kernels), for head sizes 64 (SmolLM2: 9 q / 3 kv heads) and 128 (Llama-3-8B: 32 q / 8 kv).
"""

from __future__ import annotations

import pytest
import torch

from kubellm.engine.attention import AttentionMetadata, TorchPagedAttention, kv_cache_shape
from kubellm.engine.forward_batch import ForwardBatch, ScheduledSeq

pytestmark = pytest.mark.gpu

BLOCK = 16
NUM_BLOCKS = 96
SHAPES = {64: (9, 3), 128: (32, 8)}  # head_dim -> (q heads, kv heads)


def _flashinfer_cls():
    import flashinfer  # noqa: F401  (a GPU machine without flashinfer fails here, never skips)

    from kubellm.engine.attention.flashinfer_backend import FlashInferAttention

    return FlashInferAttention


def _tables(lens: list[int], gen: torch.Generator) -> list[list[int]]:
    """Disjoint, shuffled block tables (so a wrong page index reads someone else's keys)."""
    perm = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    tables, at = [], 0
    for n in lens:
        k = -(-n // BLOCK)
        tables.append(perm[at : at + k])
        at += k
    return tables


def _case(head_dim: int, cached: list[int], new: list[int], seed: int = 0):
    """A bf16 cache holding `cached[i]` random tokens per sequence, and q/k/v for `new[i]` more."""
    hq, hkv = SHAPES[head_dim]
    gen = torch.Generator().manual_seed(seed)
    tables = _tables([c + n for c, n in zip(cached, new, strict=True)], gen)
    cache = torch.randn(kv_cache_shape(NUM_BLOCKS, BLOCK, hkv, head_dim), generator=gen).to("cuda", torch.bfloat16)
    batch = ForwardBatch(
        [ScheduledSeq(f"s{i}", [0] * n, c, tables[i], True) for i, (c, n) in enumerate(zip(cached, new, strict=True))]
    )
    t = sum(new)
    q, k, v = (torch.randn(t, h, head_dim, generator=gen).to("cuda", torch.bfloat16) for h in (hq, hkv, hkv))
    return batch, cache, q, k, v


def _compare(head_dim: int, batch, cache, q, k, v, sliding_window: int | None = None, **fi_kwargs) -> None:
    hq, hkv = SHAPES[head_dim]
    scale = head_dim**-0.5
    meta = AttentionMetadata.from_batch(batch, BLOCK, "cuda")
    fi = _flashinfer_cls()(
        hq, hkv, head_dim, scale, BLOCK, dtype=torch.bfloat16, device="cuda", sliding_window=sliding_window,
        **fi_kwargs,
    )  # fmt: skip
    ref = TorchPagedAttention(hq, hkv, head_dim, scale, BLOCK, sliding_window=sliding_window)
    fi_cache, ref_cache = cache.clone(), cache.float()
    fi.begin_step(meta)
    out = fi.forward(0, q, k, v, fi_cache)
    ref.begin_step(meta)
    expected = ref.forward(0, q.float(), k.float(), v.float(), ref_cache)
    torch.cuda.synchronize()
    # The cache writes are exact copies: both backends must leave the same cache.
    assert torch.equal(fi_cache.float(), ref_cache), "K/V written to different slots"
    err = (out.float() - expected).abs().max().item()
    assert err < 2e-2, f"max abs error {err:.3e} against the float32 reference"


@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_matches_reference(head_dim):
    batch, cache, q, k, v = _case(head_dim, cached=[0, 0, 0], new=[37, 16, 100])
    _compare(head_dim, batch, cache, q, k, v)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_chunked_prefill_over_cached_prefix_with_decodes(head_dim):
    # Two chunks continue cached prefixes (one mid-block), two rows decode: one mixed step.
    batch, cache, q, k, v = _case(head_dim, cached=[32, 21, 50, 7], new=[24, 40, 1, 1], seed=1)
    _compare(head_dim, batch, cache, q, k, v)


@pytest.mark.parametrize("tensor_cores", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_matches_reference(head_dim, tensor_cores):
    batch, cache, q, k, v = _case(head_dim, cached=[1, 15, 16, 17, 200, 63], new=[1] * 6, seed=2)
    _compare(head_dim, batch, cache, q, k, v, use_tensor_cores=tensor_cores)


@pytest.mark.parametrize("tensor_cores", [False, True])
def test_sliding_window_matches_reference(tensor_cores):
    """Mistral's window through flashinfer's window_left: prefill, chunks over a cached prefix, and decodes."""
    batch, cache, q, k, v = _case(128, cached=[0, 40, 0], new=[100, 24, 1], seed=3)
    _compare(128, batch, cache, q, k, v, sliding_window=32)
    batch, cache, q, k, v = _case(128, cached=[1, 15, 200, 63], new=[1] * 4, seed=4)
    _compare(128, batch, cache, q, k, v, sliding_window=32, use_tensor_cores=tensor_cores)


def test_selector_takes_flashinfer_on_cuda():
    from kubellm.engine.attention import select_backend_class

    assert select_backend_class("auto", torch.device("cuda")) is _flashinfer_cls()
    assert select_backend_class("torch", torch.device("cuda")) is TorchPagedAttention
