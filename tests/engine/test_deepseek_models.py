"""Acceptance of the [mla] issue on CPU: DeepSeek-V2 and DeepSeek-V3 checkpoints as transformers saves them give
transformers' logits through multi-head latent attention over the paged latent cache (between them: q_lora on and
off, softmax and sigmoid gating with a correction bias, group-limited top-k, shared experts, a dense first layer,
YaRN with mscale, both rope layouts); greedy generation through LLM.generate equals transformers' with chunked
prefill over a cached prefix, prefix caching and a preemption; tensor parallelism at 2 equals 1. The same with the
up-projected prefill path (engine setting mla_upproject_min_tokens): whole prefills, chunks over a cached prefix
and a step mixing up-projected chunks with absorbed short chunks and decodes give transformers' logits."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from greedy_reference import assert_greedy_equal, reference_greedy
from tiny_models import DEEPSEEK_KINDS, TINY_VOCAB, full_pass_logits, hf_logits, make_runner
from tp_parity import assert_tp2_decodes_as_tp1, cpu_tp_config

from kubellm.engine import LLM, SamplingParams
from kubellm.engine.attention import AttentionMetadata
from kubellm.engine.forward_batch import ForwardBatch, ScheduledSeq
from kubellm.engine.llm_engine import LLMEngine
from kubellm.engine.loader import load_model
from kubellm.engine.model_config import UnsupportedModelError
from kubellm.engine.models.deepseek import DeepseekMoE

_rng = random.Random(7)
IDS = [_rng.randrange(4, TINY_VOCAB) for _ in range(45)]  # one generator: distinct tokens, so attention matters


@pytest.mark.parametrize("upproject", [0, 1], ids=["absorbed", "up-projected"])
@pytest.mark.parametrize("kind", DEEPSEEK_KINDS)
def test_teacher_forced_logits_equal_transformers(kind, upproject, tiny_model_dir, hf_model):
    loaded = load_model(tiny_model_dir(kind))
    c = loaded.config
    assert (c.num_key_value_heads, c.head_dim) == (1, 32 + 8), "one latent head of kv_lora_rank + qk_rope_head_dim"
    assert c.rope_type == "yarn" and c.n_group == 4 and c.topk_group == 2
    runner = make_runner(loaded, num_blocks=8, mla_upproject_min_tokens=upproject)
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
    assert (runner.attn.mla_split is not None) == bool(upproject), "the prefill took the other path"
    err = float((ours - ref).norm() / ref.norm())
    assert err < 2e-5, f"{kind}: relative L2 error {err:.2e}"


def _step_logits(runner, seqs: list[ScheduledSeq]) -> torch.Tensor:
    """Logits of every new row of one step [T, V], through the runner's model and backend."""
    meta = AttentionMetadata.from_batch(ForwardBatch(seqs), runner.block_size)
    ids = torch.tensor([t for s in seqs for t in s.token_ids])
    with torch.inference_mode():
        runner.attn.begin_step(meta)
        return runner.model.compute_logits(runner.model(ids, meta.positions, runner.kv_caches, runner.attn))


@pytest.mark.parametrize("kind", DEEPSEEK_KINDS)
def test_upprojected_chunks_over_a_cached_prefix_mixed_with_decodes_equal_transformers(kind, tiny_model_dir, hf_model):
    """Step 1 prefills three prompts' first chunks (up-projected at min 4); step 2 mixes, in this order, a decode, a
    chunk over a cached prefix that ends mid-block (up-projected), a 3-token chunk (absorbed: below 4) and a fresh
    prompt (up-projected). Every row's logits equal transformers' and the all-absorbed engine's. Then again with a
    bound of 45 context tokens a step (mla_upproject_max_context_tokens): in step 1 the first chunk (21) and the
    third (21 + 10) go up-projected, the second (30 more) absorbed; in step 2 the chunk over the cached prefix (41)
    goes up-projected and the fresh prompt (41 + 12) absorbed; the logits do not change."""
    rng = random.Random(21)
    a, b, cc, d = ([rng.randrange(4, TINY_VOCAB) for _ in range(n)] for n in (41, 31, 13, 12))
    tables = {"a": [0, 1, 2], "b": [3, 4], "c": [5], "d": [6]}
    loaded = load_model(tiny_model_dir(kind))
    logits = {}
    for name, min_tokens, bound in (("absorbed", 0, None), ("up-projected", 4, None), ("bounded", 4, 45)):
        runner = make_runner(
            loaded, num_blocks=8, mla_upproject_min_tokens=min_tokens, mla_upproject_max_context_tokens=bound
        )
        first = [
            ScheduledSeq("a", a[:21], 0, tables["a"], False),
            ScheduledSeq("b", b[:30], 0, tables["b"], True),
            ScheduledSeq("c", cc[:10], 0, tables["c"], False),
        ]
        _step_logits(runner, first)
        assert (runner.attn.mla_split is not None) == bool(min_tokens)
        if name == "bounded":
            assert runner.attn.mla_split.plan.up_seqs.tolist() == [0, 2]
            assert runner.attn.upproject_deferred_tokens == 30
        second = [
            ScheduledSeq("b", b[30:], 30, tables["b"], True),
            ScheduledSeq("a", a[21:], 21, tables["a"], True),
            ScheduledSeq("c", cc[10:], 10, tables["c"], True),
            ScheduledSeq("d", d, 0, tables["d"], True),
        ]
        logits[name] = _step_logits(runner, second)
        split = runner.attn.mla_split
        if name == "up-projected":
            assert split is not None and split.plan.up_seqs.tolist() == [1, 3]
            assert split.plan.absorbed_rows.tolist() == [0, 21, 22, 23]
            assert runner.attn.upproject_deferred_tokens == 0
        elif name == "bounded":
            assert split is not None and split.plan.up_seqs.tolist() == [1]
            assert split.plan.absorbed_rows.tolist() == [0] + list(range(21, 36))
            assert runner.attn.upproject_deferred_tokens == 30 + 12
    ref = torch.cat(
        [hf_logits(hf_model(kind), b)[30:], hf_logits(hf_model(kind), a)[21:], hf_logits(hf_model(kind), cc)[10:],
         hf_logits(hf_model(kind), d)]
    )  # fmt: skip
    for name, ours in logits.items():
        err = float((ours - ref).norm() / ref.norm())
        assert err < 2e-5, f"{kind} {name}: relative L2 error {err:.2e} against transformers"
    for name in ("up-projected", "bounded"):
        between = float((logits[name] - logits["absorbed"]).norm() / logits["absorbed"].norm())
        assert between < 1e-5, f"{kind} {name}: relative L2 {between:.2e} against the absorbed path"


@pytest.mark.parametrize("upproject", [0, 2], ids=["absorbed", "up-projected"])
def test_greedy_generate_equals_transformers_with_chunks_prefix_cache_and_preemption(
    upproject, tiny_model_dir, hf_model
):
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
        mla_upproject_min_tokens=upproject,
    )  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    first = llm.generate([{"prompt_token_ids": prompts[0]}], params)  # the shared prefix is cached from here on
    rest = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], params)
    outs = [list(o.outputs[0].token_ids) for o in first + rest]
    stats = llm.engine.stats()
    assert (llm.engine.runner.attn.upprojected_tokens > 0) == bool(upproject), "the prefill took the other path"
    # the auto bound, 2 x 16 context tokens a step, sends the chunks over the cached 35-token prefix absorbed
    assert (llm.engine.runner.attn.upproject_deferred_tokens > 0) == bool(upproject), "the bound was meant to bite"
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
@pytest.mark.parametrize("upproject", [0, 4], ids=["absorbed", "up-projected"])
def test_tp2_equals_tp1_with_heads_and_experts_split_and_the_latent_cache_replicated(upproject, tiny_model_dir):
    path = tiny_model_dir("deepseek-v2")  # plain query projection: q_proj, kv_b_proj and o_proj split by head
    rng = random.Random(3)
    prompts = [[rng.randrange(4, TINY_VOCAB) for _ in range(n)] for n in (4, 19, 33)]
    engines = []

    def engine(tp: int) -> LLMEngine:
        engines.append(LLMEngine(cpu_tp_config(str(path), tp, mla_upproject_min_tokens=upproject)))
        return engines[-1]

    parity = assert_tp2_decodes_as_tp1(engine, prompts, 10, "deepseek-v2")
    for e in engines:  # rank 0's backend: the prompts' chunks went up-projected (each rank its own heads' K/V)
        attn = getattr(e.runner, "inner", e.runner).attn
        assert (attn.upprojected_tokens > 0) == bool(upproject)
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
