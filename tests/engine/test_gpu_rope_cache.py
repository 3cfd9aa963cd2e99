"""The rotary embedding with the KV write folded in (models/fused.py's rope_cache) against the two steps it replaces:
the rotary kernel, then the flashinfer backend's index_copy_ of k and v into the paged cache (GPU only; skipped
without CUDA).

- the kernel: q and the whole cache bit-equal to rope + index_copy_, for Llama-3-8B's heads (32 q / 8 kv x 128) and
  SmolLM2's (9 / 3 x 64), q/k/v as the strided views of one qkv projection, prefill-sized and decode-sized batches;
- the model: a runner with the fusion and one without give bit-equal logits teacher-forced through one prefill and
  48 CUDA-graph decode steps, and bit-equal KV caches; with the fusion no layer wrote through index_copy_.
- a Qwen3-shaped model (per-head q/k RMSNorm, random norm weights): with the norm folded into the rotary kernels
  (fused_qk_norm, the default), the rope_cache runner and the rope + index_copy_ runner give bit-equal logits and
  caches; with fused_qk_norm off (llama.py's torch norms) the logits and caches are those of the fusion within bf16
  rounding.
(The CUDA-graph-vs-eager, async and CPU-parity tests of test_gpu_model.py run with the fusion, the default.)
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from gpu_model_setup import BLOCK, bf16_rounded_random_model, small_runner, teacher_forced_logits

pytestmark = pytest.mark.gpu

PROMPTS, POSITIONS, PREFILL = 8, 64, 16


def _fused():
    from kubellm.engine.loader import load_model  # noqa: F401 - import order: loader before models
    from kubellm.engine.models import fused

    fused.configure(True, rope_cache=True)  # as an engine with default settings leaves them
    assert fused.enabled(torch.empty(1, device="cuda")), "Triton kernels unavailable on CUDA"
    return fused


@pytest.mark.parametrize(("hq", "hkv", "d"), [(32, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize("t", [1, 7, 33, 300])
def test_rope_cache_equals_rope_then_index_copy(hq, hkv, d, t):
    fused = _fused()
    gen = torch.Generator(device="cuda").manual_seed(t + d)
    dt, blocks = torch.bfloat16, 40
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=gen, device="cuda").to(dt)
    q, k, v = qkv.split((hq * d, hkv * d, hkv * d), dim=-1)
    q, k, v = q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d)
    pos = torch.randint(0, 8000, (t,), generator=gen, device="cuda")
    freqs = pos.float()[:, None] * (500000.0 ** (-torch.arange(0, d, 2, device="cuda") / d))
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    cos, sin = emb.cos().to(dt), emb.sin().to(dt)
    slots = torch.randperm(blocks * BLOCK, generator=gen, device="cuda")[:t]  # distinct, scattered over blocks
    cache = torch.randn(blocks, 2, BLOCK, hkv, d, generator=gen, device="cuda").to(dt)
    want_cache = cache.clone()
    want_q, want_k = fused.rope(q, k, cos, sin)
    rows = torch.div(slots, BLOCK, rounding_mode="floor") * BLOCK + slots  # the backend's K rows; V: + BLOCK
    flat = want_cache.view(-1, hkv, d)
    flat.index_copy_(0, rows, want_k)
    flat.index_copy_(0, rows + BLOCK, v)

    got_q = fused.rope_cache(q, k, v, cos, sin, cache, slots)
    assert got_q is not None, "the fused kernel did not apply"
    assert torch.equal(got_q, want_q)
    assert torch.equal(cache, want_cache), "K/V rows (and every other row) as rope + index_copy_ leave them"
    assert fused._state["ok"] and not fused.failed_ops()


def test_rope_cache_declines_what_it_cannot_write():
    fused = _fused()
    t, hq, hkv, d = 4, 8, 2, 64
    q, k, v = (torch.zeros(t, h, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    cos = sin = torch.zeros(t, 1, d, device="cuda", dtype=torch.bfloat16)
    slots = torch.arange(t, device="cuda")
    fp8_cache = torch.zeros(2, 2, BLOCK, hkv, d, device="cuda").to(torch.float8_e4m3fn)
    assert fused.rope_cache(q, k, v, cos, sin, fp8_cache, slots) is None  # scaled FP8 writes stay the backend's
    cache = torch.zeros(2, 2, BLOCK, hkv, d, device="cuda", dtype=torch.bfloat16)
    assert fused.rope_cache(q, k, v, cos, sin, cache, slots.int()) is None
    assert fused.rope_cache(q, k, v, cos, sin, cache, slots) is not None
    assert fused._state["ok"] and not fused.failed_ops(), "declining is not a failure"


@pytest.fixture(scope="module")
def loaded():
    import flashinfer  # noqa: F401  (a GPU machine without flashinfer fails here, never skips)

    from kubellm.engine.random_model import SMOLLM2_135M

    return bf16_rounded_random_model(SMOLLM2_135M, std=0.02, embed_std=0.2)


def test_fused_kv_write_gives_the_unfused_models_logits_and_cache(loaded):
    _fused()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, loaded.config.vocab_size, (PROMPTS, POSITIONS), generator=gen).tolist()

    def run(rope_cache: bool):  # the engine setting, whatever KUBELLM_ROPE_CACHE says; graphs capture its choice
        runner = small_runner(loaded, "cuda", PROMPTS, POSITIONS, rope_cache=rope_cache)
        assert runner._graphs, "CUDA graphs were not captured"
        logits = teacher_forced_logits(runner, tokens, PREFILL)
        assert runner.graph_replays == POSITIONS - PREFILL
        caches = torch.stack([c[: runner.num_blocks] for c in runner.kv_caches])  # the dummy block left out
        return logits, caches, runner.attn._rows is None

    fused_logits, fused_cache, no_rows = run(rope_cache=True)
    assert no_rows, "with the fusion no layer wrote K/V through index_copy_"
    plain_logits, plain_cache, no_rows = run(rope_cache=False)
    assert not no_rows, "without it the backend wrote them"
    assert torch.equal(fused_cache, plain_cache)
    assert torch.equal(fused_logits, plain_logits)


def tiny_qwen3_config():
    from kubellm.engine.random_model import QWEN3_30B_A3B

    return dataclasses.replace(
        QWEN3_30B_A3B, architecture="Qwen3ForCausalLM", vocab_size=2048, hidden_size=512, intermediate_size=1024,
        num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, head_dim=128, num_experts=0,
        num_experts_per_tok=0, moe_intermediate_size=0, max_position_embeddings=512, bos_token_id=1,
        eos_token_ids=[2],
    )  # fmt: skip


@pytest.fixture(scope="module")
def qwen3():
    import flashinfer  # noqa: F401  (a GPU machine without flashinfer fails here, never skips)

    model = bf16_rounded_random_model(tiny_qwen3_config(), std=0.05, embed_std=0.5)
    assert model.config.qk_norm
    gen = torch.Generator().manual_seed(1)
    for name in list(model.weights):  # the random model's norms are ones: give q/k norms weights that matter
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            w = model.weights[name]
            model.weights[name] = (1 + 0.5 * torch.randn(w.shape, generator=gen)).to(torch.bfloat16).float()
    return model


def _qwen3_run(loaded, tokens, **settings):
    runner = small_runner(loaded, "cuda", PROMPTS, POSITIONS, **settings)
    assert runner._graphs, "CUDA graphs were not captured"
    logits = teacher_forced_logits(runner, tokens, PREFILL)
    assert runner.graph_replays == POSITIONS - PREFILL
    caches = torch.stack([c[: runner.num_blocks] for c in runner.kv_caches])  # the dummy block left out
    return logits, caches, runner.attn._rows is None


def test_qk_norm_in_the_rotary_kernels_gives_the_unfused_models_logits_and_cache(qwen3):
    _fused()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, qwen3.config.vocab_size, (PROMPTS, POSITIONS), generator=gen).tolist()

    # norm + rotary + KV write in one kernel, against norm + rotary, then the backend's index_copy_
    one_logits, one_cache, no_rows = _qwen3_run(qwen3, tokens, rope_cache=True, fused_qk_norm=True)
    assert no_rows, "with the fusion no layer wrote K/V through index_copy_"
    two_logits, two_cache, no_rows = _qwen3_run(qwen3, tokens, rope_cache=False, fused_qk_norm=True)
    assert not no_rows
    assert torch.equal(one_cache, two_cache)
    assert torch.equal(one_logits, two_logits)

    # against the torch norms (the kill switch): equal within bf16 rounding of the normalised values
    torch_logits, torch_cache, _ = _qwen3_run(qwen3, tokens, rope_cache=True, fused_qk_norm=False)
    cache_err = (one_cache.float() - torch_cache.float()).norm() / torch_cache.float().norm()
    assert cache_err < 1e-2, f"KV cache relative L2 {cache_err:.2e}"
    rel = (one_logits - torch_logits).norm(dim=-1) / torch_logits.norm(dim=-1)
    print(f"fused vs torch q/k norm: cache rel L2 {cache_err:.2e}, logits rel L2 max {rel.max():.2e}")
    assert rel.max() < 3e-2, f"logits relative L2 up to {rel.max():.2e}"
    assert (one_logits.argmax(-1) == torch_logits.argmax(-1)).float().mean() > 0.9
