"""Qwen3's per-head q/k RMSNorm fused into the rotary kernels (models/fused.py: rope and rope_cache with `qk_norm`)
and on its own (rms_norm's 3-D form), against the torch ops of llama.py's RMSNorm they replace (GPU only; skipped
without CUDA).

- rope(qk_norm) against torch's norm then rope: the same values but for rare last-bit flips of the normalised value
  (the float32 statistics are summed in another order), at 1/7/33/300 tokens, Qwen3-30B-A3B's heads (32 q / 4 kv x
  128) and SmolLM2-sized ones (9 / 3 x 64: heads that do not fill a program), q/k as strided views of one qkv
  projection;
- rope_cache(qk_norm) against rope(qk_norm) then index_copy_: bit-equal q and cache (the same arithmetic);
- rms_norm on 3-D strided views (heads not adjacent too) against torch, into contiguous outputs;
- the launch wrappers decline what the kernels cannot do without counting it as a failure.
(The runner-level check, logits and KV with the fusion on and off, is in test_gpu_rope_cache.py.)
"""

from __future__ import annotations

import pytest
import torch
from gpu_model_setup import BLOCK

pytestmark = pytest.mark.gpu

DT = torch.bfloat16
EPS = 1e-6
SHAPES = [(32, 4, 128), (9, 3, 64)]
TOKENS = [1, 7, 33, 300]


def _fused():
    from kubellm.engine.loader import load_model  # noqa: F401 - import order: loader before models
    from kubellm.engine.models import fused

    fused.configure(True, rope_cache=True, qk_norm=True)  # as an engine with default settings leaves them
    assert fused.enabled(torch.empty(1, device="cuda")), "Triton kernels unavailable on CUDA"
    return fused


def torch_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """llama.py RMSNorm's torch path, written out: float32 statistics, rounded, then scaled in the model dtype."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def assert_close_but_rare_flips(got: torch.Tensor, want: torch.Tensor, label: str) -> None:
    """Equal except a few elements one or two bf16 steps apart: a wrong weight, half, head or eps moves most."""
    assert got.shape == want.shape and got.dtype == want.dtype
    differ = (got != want).float().mean().item()
    worst = (got.float() - want.float()).abs().max().item()
    assert differ < 0.01, f"{label}: {differ:.4f} of the elements differ"
    assert worst <= 2 * 2**-7 * want.float().abs().max().item(), f"{label}: max difference {worst}"


def _inputs(t: int, hq: int, hkv: int, d: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qkv = (3 * torch.randn(t, (hq + 2 * hkv) * d, generator=gen, device="cuda")).to(DT)  # not already unit-RMS
    q, k, v = qkv.split((hq * d, hkv * d, hkv * d), dim=-1)
    q, k, v = q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d)
    qw = (1 + 0.5 * torch.randn(d, generator=gen, device="cuda")).to(DT)
    kw = (1 + 0.5 * torch.randn(d, generator=gen, device="cuda")).to(DT)
    pos = torch.randint(0, 30000, (t,), generator=gen, device="cuda")
    freqs = pos.float()[:, None] * (1e6 ** (-torch.arange(0, d, 2, device="cuda") / d))
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    return q, k, v, qw, kw, emb.cos().to(DT), emb.sin().to(DT), gen


@pytest.mark.parametrize(("hq", "hkv", "d"), SHAPES)
@pytest.mark.parametrize("t", TOKENS)
def test_rope_with_qk_norm_equals_torch_norm_then_rope(hq, hkv, d, t):
    fused = _fused()
    q, k, _, qw, kw, cos, sin, _ = _inputs(t, hq, hkv, d, seed=t + d)
    assert t == 1 or q.stride(0) == (hq + 2 * hkv) * d, "q/k are strided views of the qkv output, as in the model"
    want_q, want_k = fused.rope(torch_norm(q, qw), torch_norm(k, kw), cos, sin)
    got = fused.rope(q, k, cos, sin, (qw, kw, EPS))
    assert got is not None, "the fused kernel did not apply"
    assert_close_but_rare_flips(got[0], want_q, "q")
    assert_close_but_rare_flips(got[1], want_k, "k")
    # the weights matter: the norm without them (ones) gives other values
    ones = torch.ones_like(qw)
    unweighted = fused.rope(q, k, cos, sin, (ones, ones, EPS))
    assert (unweighted[0] != got[0]).float().mean() > 0.5
    assert fused._state["ok"] and not fused.failed_ops()


@pytest.mark.parametrize(("hq", "hkv", "d"), SHAPES)
@pytest.mark.parametrize("t", TOKENS)
def test_rope_cache_with_qk_norm_equals_rope_then_index_copy(hq, hkv, d, t):
    fused = _fused()
    q, k, v, qw, kw, cos, sin, gen = _inputs(t, hq, hkv, d, seed=7 * t + d)
    blocks = 40
    slots = torch.randperm(blocks * BLOCK, generator=gen, device="cuda")[:t]  # distinct, scattered over blocks
    cache = torch.randn(blocks, 2, BLOCK, hkv, d, generator=gen, device="cuda").to(DT)
    want_cache = cache.clone()
    want_q, want_k = fused.rope(q, k, cos, sin, (qw, kw, EPS))
    rows = torch.div(slots, BLOCK, rounding_mode="floor") * BLOCK + slots  # the backend's K rows; V: + BLOCK
    flat = want_cache.view(-1, hkv, d)
    flat.index_copy_(0, rows, want_k)
    flat.index_copy_(0, rows + BLOCK, v)

    got_q = fused.rope_cache(q, k, v, cos, sin, cache, slots, (qw, kw, EPS))
    assert got_q is not None, "the fused kernel did not apply"
    assert torch.equal(got_q, want_q)
    assert torch.equal(cache, want_cache), "K/V rows (and every other row) as rope + index_copy_ leave them"
    # and within the tolerance of the torch norm, as the model's unfused path computes it
    torch_q, torch_k = fused.rope(torch_norm(q, qw), torch_norm(k, kw), cos, sin)
    assert_close_but_rare_flips(got_q, torch_q, "q")
    assert_close_but_rare_flips(cache.view(-1, hkv, d)[rows], torch_k, "cached k")
    assert fused._state["ok"] and not fused.failed_ops()


@pytest.mark.parametrize("t", TOKENS)
def test_rms_norm_on_strided_heads(t):
    fused = _fused()
    hq, hkv, d = 32, 4, 128
    q, k, _, qw, kw, _, _, gen = _inputs(t, hq, hkv, d, seed=3 * t)
    every_other = torch.randn(t, 2 * hq, d, generator=gen, device="cuda").to(DT)[:, ::2]  # head stride 2 * d
    for x, w in ((q, qw), (k, kw), (every_other, qw)):
        got = fused.rms_norm(x, w, EPS)
        assert got is not None and got.is_contiguous()
        assert_close_but_rare_flips(got, torch_norm(x, w), f"rms_norm {tuple(x.stride())}")
    assert fused._state["ok"] and not fused.failed_ops()


def test_the_wrappers_decline_without_failing():
    fused = _fused()
    q, k, v, qw, kw, cos, sin, _ = _inputs(4, 8, 2, 64, seed=0)
    assert fused.rope(q, k, cos, sin, (qw.float(), kw.float(), EPS)) is None  # the torch path would not round
    assert fused.rope(q, k, cos, sin, (qw[:32], kw[:32], EPS)) is None
    cache = torch.zeros(2, 2, BLOCK, 2, 64, device="cuda", dtype=DT)
    slots = torch.arange(4, device="cuda")
    assert fused.rope_cache(q, k, v, cos, sin, cache, slots, (qw.float(), kw, EPS)) is None
    assert fused.rope_cache(q, k, v, cos, sin, cache, slots, (qw, kw, EPS)) is not None
    fused.configure(True, rope_cache=True, qk_norm=False)
    try:
        assert fused.rms_norm(q, qw, EPS) is None, "the per-head form answers to the fused_qk_norm switch"
        assert fused.rms_norm(q.reshape(-1, 64), qw, EPS) is not None
    finally:
        fused.configure(True, rope_cache=True, qk_norm=True)
    assert fused._state["ok"] and not fused.failed_ops(), "declining is not a failure"
