"""A MoE layer's sum over its top-k expert outputs folded into the next residual-add + RMSNorm kernel
(models/fused.py's sum_add_rms_norm, fused_moe.fused_experts(reduce=False), SparseMoE.forward_unreduced; engine
setting moe_sum_norm) against the torch.sum + add_rms_norm it replaces (GPU only; skipped without CUDA):

- the kernel: the residual stream as torch.sum then torch's add leave it (rounded the same way; rare last-bit flips
  allowed, the float32 sum's order being the kernel's), the norm within the existing norm tests' tolerance, at
  1/7/33/300 tokens for Qwen3-30B-A3B's top-8 of hidden 2048, Mixtral's top-2 of 4096, and DeepSeek-V2-Lite's
  top-6 plus its shared experts' output;
- fused_experts(reduce=False) returns the very terms fused_experts sums: their torch.sum is its output bit for bit;
- a small Qwen3-MoE-shaped model without a shared expert gives the same logits with the setting on and off through
  a prefill and CUDA-graph decode steps (within bf16 rounding), and every MoE layer took the fused sum when on.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from gpu_model_setup import bf16_rounded_random_model, small_runner, teacher_forced_logits

pytestmark = pytest.mark.gpu

DT = torch.bfloat16


def _fused():
    from kubellm.engine.loader import load_model  # noqa: F401 - import order: loader before models
    from kubellm.engine.models import fused

    fused.configure(True, moe_sum_norm=True)  # every fused setting on, the opt-in moe_sum_norm too
    assert fused.enabled(torch.empty(1, device="cuda")), "Triton kernels unavailable on CUDA"
    return fused


@pytest.mark.parametrize(("k", "n", "shared"), [(8, 2048, False), (2, 4096, False), (6, 2048, True)])
@pytest.mark.parametrize("t", [1, 7, 33, 300])
def test_sum_add_rms_norm_equals_torch_sum_then_add_rms_norm(t, k, n, shared):
    """Qwen3-30B-A3B's top-8 and Mixtral's top-2 terms, and DeepSeek-V2-Lite's top-6 with its shared experts'
    output as the extra term."""
    fused = _fused()
    gen = torch.Generator(device="cuda").manual_seed(t * k)
    parts = (0.3 * torch.randn(t, k, n, generator=gen, device="cuda")).to(DT)
    residual = torch.randn(t, n, generator=gen, device="cuda").to(DT)
    w = (1 + 0.5 * torch.randn(n, generator=gen, device="cuda")).to(DT)
    extra = (0.5 * torch.randn(t, n, generator=gen, device="cuda")).to(DT) if shared else None
    total = parts.sum(dim=1) if extra is None else parts.sum(dim=1) + extra
    want_h, want_x = fused.add_rms_norm(total, residual, w, 1e-6)
    got = fused.sum_add_rms_norm(parts, residual, w, 1e-6, extra)
    assert got is not None and "sum_add_rms_norm" not in fused.failed_ops(), "the kernel refused or failed"
    got_h, got_x = got
    assert (got_h != want_h).float().mean().item() < 0.01, "the residual stream differs beyond rare last-bit flips"
    assert (got_h.float() - want_h.float()).abs().max() <= 2**-7 * want_h.float().abs().max()
    assert (got_x.float() - want_x.float()).abs().max() <= 2 * 2**-7 * want_x.float().abs().max()
    assert (got_x != want_x).float().mean().item() < 0.02


@pytest.mark.parametrize("t", [1, 7, 33, 300])
def test_unreduced_experts_are_the_terms_fused_experts_sums(t):
    _fused()
    from kubellm.engine.models import fused_moe

    e, k, h, inter = 16, 4, 512, 256
    gen = torch.Generator(device="cuda").manual_seed(t)
    x = torch.randn(t, h, generator=gen, device="cuda").to(DT)
    w13 = (0.05 * torch.randn(e, 2 * inter, h, generator=gen, device="cuda")).to(DT)
    w2 = (0.05 * torch.randn(e, h, inter, generator=gen, device="cuda")).to(DT)
    logits = torch.randn(t, e, generator=gen, device="cuda")
    w, ids = fused_moe.fused_topk(logits, k, True)
    summed = fused_moe.fused_experts(x, w13, w2, w, ids)
    parts = fused_moe.fused_experts(x, w13, w2, w, ids, reduce=False)
    if parts.dim() == 2:  # the token-major down_sum path sums in its GEMM: nothing to defer
        assert torch.equal(parts, summed)
        return
    assert parts.shape == (t, k, h)
    assert torch.equal(parts.sum(dim=1), summed)


def _no_shared_config():
    from kubellm.engine.random_model import QWEN3_30B_A3B

    return dataclasses.replace(
        QWEN3_30B_A3B, vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=16, num_experts_per_tok=4,
        moe_intermediate_size=128, mlp_only_layers=[1], max_position_embeddings=512, bos_token_id=1,
        eos_token_ids=[2],
    )  # fmt: skip


def test_model_logits_with_the_sum_in_the_norm_kernel_or_not():
    import flashinfer  # noqa: F401 - the GPU path needs it: missing, this fails rather than skips

    fused = _fused()
    loaded = bf16_rounded_random_model(_no_shared_config(), std=0.05, embed_std=0.5)
    prompts, positions, prefill = 6, 40, 16
    tokens = torch.randint(3, 2048, (prompts, positions), generator=torch.Generator().manual_seed(0)).tolist()

    def run(moe_sum_norm: bool):
        calls = []
        real = fused.sum_add_rms_norm

        def counted(*args, **kw):
            out = real(*args, **kw)
            calls.append(out is not None)
            return out

        fused.sum_add_rms_norm = counted
        try:
            runner = small_runner(loaded, "cuda", prompts, positions, moe_sum_norm=moe_sum_norm)
            assert runner._graphs, "CUDA graphs were not captured"
            logits = teacher_forced_logits(runner, tokens, prefill)
            assert runner.graph_replays == positions - prefill
        finally:
            fused.sum_add_rms_norm = real
        return logits.reshape(-1, logits.shape[-1]), calls

    on, calls = run(True)
    assert calls and all(calls), "every sparse layer's sum went to the norm kernel"
    off, calls = run(False)
    assert not any(calls)
    rel = (on - off).norm(dim=-1) / off.norm(dim=-1)
    agree = (on.argmax(-1) == off.argmax(-1)).float().mean().item()
    print(f"moe_sum_norm on vs off: logits relative L2 median {rel.median():.2e} max {rel.max():.2e}, argmax {agree}")
    assert rel.median() < 1e-2 and agree > 0.9
