"""Gemma 3 on tiny random checkpoints: our forward equals transformers' (float32 logits) from a GGUF file written as
llama.cpp writes it and from a Hugging Face directory; per-layer sliding windows hold through chunked prefill,
prefix caching and decode; the engine's greedy tokens equal transformers' `generate`; what Gemma 3 variants we do
not implement fails clearly."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from greedy_reference import assert_greedy_equal, engine_greedy, reference_greedy
from tiny_gemma3 import random_gemma3, save_tiny_gemma3_dir, tiny_gemma3_config, write_tiny_gemma3_gguf
from tiny_models import full_pass_logits, hf_logits, make_runner, max_rel_err

from kubellm.engine.attention import AttentionMetadata, TorchPagedAttention, kv_cache_shape
from kubellm.engine.config import EngineConfig
from kubellm.engine.forward_batch import ForwardBatch, ScheduledSeq
from kubellm.engine.llm_engine import LLMEngine
from kubellm.engine.loader import load_model
from kubellm.engine.model_config import FULL, SLIDING, ModelConfig, UnsupportedModelError

TOL = 2e-5  # float32, same weights: only summation order differs


@pytest.fixture(scope="module")
def gemma3_vocab_source():
    from kubellm.builtin_models import GEMMA3_270M, builtin_model_path

    return builtin_model_path(GEMMA3_270M)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, gemma3_vocab_source):
    """(our loaded model, transformers' model read from the same GGUF file)."""
    from transformers import AutoModelForCausalLM

    model = random_gemma3(tiny_gemma3_config(), seed=0)
    path = write_tiny_gemma3_gguf(model, gemma3_vocab_source, tmp_path_factory.mktemp("gemma3") / "tiny.gguf")
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return path, ref


def _ids(n: int, seed: str, vocab: int = 1024) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, vocab) for _ in range(n)]


def test_gguf_config_is_read_as_llama_cpp_fills_it_in(tiny_gguf):
    path, ref = tiny_gguf
    c = load_model(path, load_weights=False).config
    assert c.architecture == "Gemma3ForCausalLM" and c.hidden_act == "gelu_pytorch_tanh" and c.qk_norm
    assert c.layer_types == [SLIDING] * 5 + [FULL] == ref.config.layer_types  # every 6th layer global
    assert c.sliding_window == 8 and c.head_dim == 256 and c.attention_scale == 256**-0.5
    assert (c.rope_theta, c.rope_local_theta) == (1_000_000.0, 10_000.0)
    assert c.tie_word_embeddings and c.bos_token_id == 2
    assert c.eos_token_ids == [1, 106]  # <eos> and <end_of_turn>
    assert c.attention_windows(256) == [8] * 5 + [None]  # per layer
    assert c.attention_windows(8) is None  # a window as long as the context changes nothing


def test_gguf_logits_match_transformers(tiny_gguf):
    """Norms stored as 1 + w, the Q8_0 embedding, sandwich norms, local/global rope and per-layer windows (8
    tokens, far shorter than the 60-token sequence) all line up with transformers' GGUF loader."""
    path, ref = tiny_gguf
    ids = _ids(60, "gguf")
    ours = full_pass_logits(make_runner(load_model(path), num_blocks=32, block_size=8), ids)
    expected = hf_logits(ref, ids)
    assert max_rel_err(ours, expected) < TOL, f"relative error {max_rel_err(ours, expected):.2e}"


def test_hf_directory_logits_match_transformers(tmp_path):
    """config.json path: query_pre_attn_scalar != head_dim, head_dim != hidden/heads, an explicit layer_types
    list, linear rope scaling on the global layers only, untied LM head."""
    config = tiny_gemma3_config(
        vocab_size=320,
        num_hidden_layers=4,
        head_dim=32,
        query_pre_attn_scalar=48,
        layer_types=[SLIDING, FULL, SLIDING, FULL],
        tie_word_embeddings=False,
        rope_parameters={
            FULL: {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
            SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        },
    )
    model = random_gemma3(config, seed=3)
    loaded = load_model(save_tiny_gemma3_dir(model, tmp_path / "gemma3"))
    c = loaded.config
    assert c.attention_scale == 48**-0.5 and c.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    ids = _ids(60, "hf", vocab=320)
    ours = full_pass_logits(make_runner(loaded, num_blocks=32, block_size=8), ids)
    assert max_rel_err(ours, hf_logits(model, ids)) < TOL


def test_windows_hold_through_chunked_prefill_and_decode(tiny_gguf):
    """Prefill chunks that read cached keys, then single-token decodes, each compared with transformers'
    teacher-forced logits at that position; without the windows the logits would differ (the test can tell)."""
    path, ref = tiny_gguf
    ids = _ids(48, "chunks")
    expected = hf_logits(ref, ids)
    runner = make_runner(load_model(path), num_blocks=32, block_size=4)
    blocks = list(range(-(-len(ids) // 4)))
    rows, ends, pos = [], [], 0
    while pos < len(ids):  # 5-token prefill chunks up to 30, then one token per step
        n = 5 if pos < 30 else 1
        rows.append(runner.logits(ForwardBatch([ScheduledSeq("r", ids[pos : pos + n], pos, blocks, True)]))[0])
        pos += n
        ends.append(pos)
    assert max_rel_err(torch.stack(rows), expected[[e - 1 for e in ends]]) < TOL
    unwindowed = make_runner(load_model(path), num_blocks=32, block_size=4)
    unwindowed.attn.layer_windows = None  # every layer global
    assert max_rel_err(full_pass_logits(unwindowed, ids), expected) > 1e-3


def test_engine_greedy_with_chunked_prefill_and_prefix_cache_equals_transformers(tiny_gguf):
    """Through the scheduler: a 16-token budget splits prompts into chunks mixed with decodes, and prompts that
    share a 20-token prefix (longer than the window) reuse cached blocks on the second pass."""
    path, ref = tiny_gguf
    prefix = _ids(20, "prefix")
    prompts = [prefix + _ids(n, f"tail{n}") for n in (3, 9, 17)] + [_ids(30, "other")]
    engine = LLMEngine(
        EngineConfig(
            model=str(path),
            device="cpu",
            block_size=4,
            max_num_batched_tokens=16,
            enable_prefix_caching=True,
            num_gpu_blocks_override=96,
        )
    )
    first = engine_greedy(engine, prompts, 12)
    hits = engine.kv.stats.hits
    second = engine_greedy(engine, prompts, 12)
    assert engine.kv.stats.hits - hits >= 4 * 20, "the second pass reads every prompt's prefix from the cache"
    assert second == first, "the cached run equals the cold one"
    for i, (p, ours) in enumerate(zip(prompts, first, strict=True)):
        expected, logits = reference_greedy(ref, p, 12)
        assert_greedy_equal(ours, expected, logits, f"tiny gemma3 prompt {i}")


def test_torch_backend_applies_each_layers_window():
    """Per-layer windows in the torch backend, against dense masked attention: layer 0 slides over 5 keys,
    layer 1 is global; a batch mixes a decode, a prefill chunk over cached keys and a fresh prefill."""
    torch.manual_seed(0)
    hq, hkv, d, bs = 4, 2, 16, 4
    attn = TorchPagedAttention(hq, hkv, d, 0.3, bs, sliding_window=[5, None])
    assert attn.windows == [5, None] and attn.window_of(1) is None
    cached, new = [13, 6, 0], [1, 7, 11]
    tables = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    lens = list(zip(cached, new, strict=True))
    batch = ForwardBatch([ScheduledSeq(f"s{i}", [0] * n, c, tables[i], True) for i, (c, n) in enumerate(lens)])
    meta = AttentionMetadata.from_batch(batch, bs)
    full_k = [torch.randn(c + n, hkv, d) for c, n in lens]
    full_v = [torch.randn(c + n, hkv, d) for c, n in lens]
    q = torch.randn(sum(new), hq, d)
    for layer, window in ((0, 5), (1, None)):
        cache = torch.zeros(kv_cache_shape(12, bs, hkv, d))
        for i, c in enumerate(cached):  # the already-cached context
            for t in range(c):
                cache[tables[i][t // bs], 0, t % bs] = full_k[i][t]
                cache[tables[i][t // bs], 1, t % bs] = full_v[i][t]
        k = torch.cat([full_k[i][c:] for i, c in enumerate(cached)])
        v = torch.cat([full_v[i][c:] for i, c in enumerate(cached)])
        attn.begin_step(meta)
        out = attn.forward(layer, q, k, v, cache)
        row = 0
        for i, (c, n) in enumerate(lens):
            qp = torch.arange(c, c + n)[:, None]
            kp = torch.arange(c + n)[None, :]
            mask = kp <= qp
            if window is not None:
                mask &= kp > qp - window
            keys = full_k[i].repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
            vals = full_v[i].repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
            expected = torch.nn.functional.scaled_dot_product_attention(
                q[row : row + n].transpose(0, 1), keys, vals, attn_mask=mask, scale=0.3
            ).transpose(0, 1)
            assert torch.allclose(out[row : row + n], expected, atol=1e-5), (layer, i)
            row += n


def test_unsupported_gemma3_variants_fail_clearly():
    base = dict(architectures=["Gemma3ForCausalLM"], vocab_size=64, hidden_size=8, intermediate_size=8)
    base |= dict(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    assert ModelConfig.from_hf_config(base).layer_types == [SLIDING, SLIDING]
    with pytest.raises(UnsupportedModelError, match="final_logit_softcapping"):
        ModelConfig.from_hf_config(base | {"final_logit_softcapping": 30.0})
    with pytest.raises(UnsupportedModelError, match="use_bidirectional_attention"):
        ModelConfig.from_hf_config(base | {"use_bidirectional_attention": True})
    with pytest.raises(UnsupportedModelError, match="Gemma3ForConditionalGeneration"):
        ModelConfig.from_hf_config(base | {"architectures": ["Gemma3ForConditionalGeneration"]})
    with pytest.raises(UnsupportedModelError, match="layer types"):
        dataclasses.replace(ModelConfig.from_hf_config(base), layer_types=["chunked_attention"] * 2)


def test_tensor_parallel_2_equals_1(tmp_path):
    """Gemma 3 shards as the Llama family does (heads, MLP, vocabulary; norms replicated): TP 2 on CPU (gloo)
    gives TP 1's greedy tokens, with windows on the sliding layers binding."""
    config = tiny_gemma3_config(vocab_size=320, num_hidden_layers=4, head_dim=32, layer_types=[SLIDING, FULL] * 2)
    path = save_tiny_gemma3_dir(random_gemma3(config, seed=5), tmp_path / "gemma3")
    prompts = [_ids(n, f"tp{n}", vocab=320) for n in (3, 20, 40)]

    def greedy(tp: int) -> list[list[int]]:
        engine = LLMEngine(
            EngineConfig(
                model=str(path), device="cpu", tensor_parallel_size=tp, num_gpu_blocks_override=64,
                max_num_batched_tokens=16,
            )
        )  # fmt: skip
        try:
            return engine_greedy(engine, prompts, 12)
        finally:
            engine.close()

    assert greedy(2) == greedy(1)
