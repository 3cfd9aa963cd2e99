"""Acceptance of the [mla] issue on CPU: DeepSeek-V2 and DeepSeek-V3 checkpoints as transformers saves them give
transformers' logits through multi-head latent attention over the paged latent cache (between them: q_lora on and
off, softmax and sigmoid gating with a correction bias, group-limited top-k, shared experts, a dense first layer,
YaRN with mscale, both rope layouts); greedy generation through LLM.generate equals transformers' with chunked
prefill over a cached prefix, prefix caching and a preemption; tensor parallelism at 2 equals 1."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from greedy_reference import assert_greedy_equal, reference_greedy
from tiny_models import DEEPSEEK_KINDS, TINY_VOCAB, full_pass_logits, hf_logits, make_runner
from tp_parity import assert_tp2_decodes_as_tp1, cpu_tp_config

from kubellm.engine import LLM, SamplingParams
from kubellm.engine.llm_engine import LLMEngine
from kubellm.engine.loader import load_model
from kubellm.engine.model_config import UnsupportedModelError
from kubellm.engine.models.deepseek import DeepseekMoE

_rng = random.Random(7)
IDS = [_rng.randrange(4, TINY_VOCAB) for _ in range(45)]  # one generator: distinct tokens, so attention matters


@pytest.mark.parametrize("kind", DEEPSEEK_KINDS)
def test_teacher_forced_logits_equal_transformers(kind, tiny_model_dir, hf_model):
    loaded = load_model(tiny_model_dir(kind))
    c = loaded.config
    assert (c.num_key_value_heads, c.head_dim) == (1, 32 + 8), "one latent head of kv_lora_rank + qk_rope_head_dim"
    assert c.rope_type == "yarn" and c.n_group == 4 and c.topk_group == 2
    runner = make_runner(loaded, num_blocks=8)
    assert [isinstance(layer.mlp, DeepseekMoE) for layer in runner.model.layers] == [False, True, True]
    # the latent-only pool: one 40-wide row (kv_lora_rank 32 + rope 8) per token and layer, no separate K and V
    assert [tuple(t.shape) for t in runner.kv_caches] == [(8, 16, 40)] * 3
    assert runner.kv_cache_bytes_per_block() == 3 * 16 * 40 * 4
    if kind == "deepseek-v3":  # the routing bias the test checkpoint carries is not the zeros it starts from
        assert c.moe_scoring == "sigmoid" and c.q_lora_rank == 24
        assert hf_model(kind).model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() > 0
    else:
        assert c.moe_scoring == "softmax" and c.q_lora_rank == 0
    ref = hf_logits(hf_model(kind), IDS)
    ours = full_pass_logits(runner, IDS)
    err = float((ours - ref).norm() / ref.norm())
    assert err < 2e-5, f"{kind}: relative L2 error {err:.2e}"


def test_greedy_generate_equals_transformers_with_chunks_prefix_cache_and_preemption(tiny_model_dir, hf_model):
    kind = "deepseek-v3"
    rng = random.Random(13)
    shared = [rng.randrange(4, TINY_VOCAB) for _ in range(35)]  # two full blocks and more, shared by 3 prompts
    prompts = [shared + [rng.randrange(4, TINY_VOCAB) for _ in range(n)] for n in (3, 9, 20)]
    prompts += [[rng.randrange(4, TINY_VOCAB) for _ in range(n)] for n in (5, 28)]
    max_new = 12
    refs = [reference_greedy(hf_model(kind), p, max_new) for p in prompts]
    longest = max(len(p) for p in prompts) + max_new
    llm = LLM(
        model=str(tiny_model_dir(kind)), device="cpu", enable_prefix_caching=True, max_num_batched_tokens=16,
        num_gpu_blocks_override=-(-longest // 16) + 4, kv_growth_reserve_tokens=0, generation_config="vllm",
    )  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    first = llm.generate([{"prompt_token_ids": prompts[0]}], params)  # the shared prefix is cached from here on
    rest = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], params)
    outs = [list(o.outputs[0].token_ids) for o in first + rest]
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0, "the KV pool was meant to be small enough to preempt"
    assert stats.prefix_hits > 0, "the shared prefix was meant to be served from the cache"
    for i, (ours, (ref, ref_logits)) in enumerate(zip(outs, refs, strict=True)):
        assert_greedy_equal(ours, ref, ref_logits, f"{kind} prompt {i}")


def test_softmax_routing_without_group_limit_runs_as_plain_top_k(tiny_model_dir):
    """DeepSeek-V2-Lite's routing (softmax, one group) takes the shared layer's softmax top-k (one kernel on CUDA):
    the layer's output equals the experts routed by DeepSeek's general top-k."""
    from kubellm.engine.models.deepseek import deepseek_topk
    from kubellm.engine.models.moe import reference_experts

    base = load_model(tiny_model_dir("deepseek-v2")).config
    config = dataclasses.replace(base, n_group=1, topk_group=1, routed_scaling_factor=1.5)
    moe = DeepseekMoE(config, torch.float32, torch.device("cpu"))
    assert moe.plain_softmax_routing and not DeepseekMoE(base, torch.float32, torch.device("cpu")).plain_softmax_routing
    gen = torch.Generator().manual_seed(0)
    for p in moe.parameters():
        p.data = torch.randn(p.shape, generator=gen) * 0.3
    x = torch.randn(9, config.hidden_size, generator=gen)
    weights, ids = deepseek_topk(x @ moe.gate.T, config, None)
    expected = reference_experts(x, moe.w13, moe.w2, weights, ids) + moe.shared_expert(x)
    torch.testing.assert_close(moe(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_tp2_equals_tp1_with_heads_and_experts_split_and_the_latent_cache_replicated(tiny_model_dir):
    path = tiny_model_dir("deepseek-v2")  # plain query projection: q_proj, kv_b_proj and o_proj split by head
    rng = random.Random(3)
    prompts = [[rng.randrange(4, TINY_VOCAB) for _ in range(n)] for n in (4, 19, 33)]

    parity = assert_tp2_decodes_as_tp1(lambda tp: LLMEngine(cpu_tp_config(str(path), tp)), prompts, 10, "deepseek-v2")
    full, counts = parity.full_counts, parity.rank_counts
    # two sparse layers of 8 experts x (2 x 16 x 64 + 64 x 16), and the 2 x 16-wide shared experts' 3 x 32 x 64
    assert full["experts"] == 2 * (8 * (2 * 16 * 64 + 64 * 16) + 3 * 32 * 64)
    assert [c["experts"] for c in counts] == [full["experts"] // 2] * 2


def test_kimi_k25_refusal_names_what_is_missing():
    from kubellm.engine.model_config import ModelConfig

    cfg = dict(architectures=["KimiK25ForConditionalGeneration"], vocab_size=10, hidden_size=8)
    with pytest.raises(UnsupportedModelError, match="INT4") as e:
        ModelConfig.from_hf_config(cfg)
    assert "checkpoint layout" in str(e.value) and "mixture of experts" not in str(e.value)
