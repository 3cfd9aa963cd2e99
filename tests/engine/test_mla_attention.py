"""Multi-head latent attention over the latent-only paged pool, on CPU: the page-table arrays flashinfer's MLA kernel
plans from (hand-written expectations), and the torch reference backend against attention computed directly from
each sequence's unpaged latent rows (so a wrong slot, block or mask shows up), for a fresh prefill, a chunk over a
cached prefix and decodes in one step. The DeepSeek random-weight model (what bench/offline.py and the GPU tests
build) runs through the engine's runner on the latent pool."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import DEEPSEEK_KINDS, tiny_hf_config

from kubellm.engine.attention import AttentionMetadata, TorchMLAAttention, select_backend_class
from kubellm.engine.attention.base import paged_kv_layout_flat
from kubellm.engine.attention.mla import (
    check_mla_budget,
    check_mla_work,
    decode_page_table,
    mla_page_table,
    mla_work_bound,
    upproject_split,
)
from kubellm.engine.forward_batch import ForwardBatch, ScheduledSeq

BLOCK = 4
HEADS, RANK, ROPE = 3, 8, 4
WIDTH = RANK + ROPE


def test_mla_page_table_of_a_mixed_step():
    # a 5-token chunk over 20 cached tokens, a decode at length 17 (its table holds a third, unused block), and a
    # fresh 16-token prefill; block size 16
    t = mla_page_table([5, 1, 16], [25, 17, 16], [[7, 3], [4, 9, 11], [2]], 16)
    assert t.qo_indptr.tolist() == [0, 5, 6, 22]
    assert t.kv_indptr.tolist() == [0, 2, 4, 5]
    assert t.kv_indices.tolist() == [7, 3, 4, 9, 2]
    assert t.kv_lens.tolist() == [25, 17, 16]
    assert {a.dtype for a in (t.qo_indptr, t.kv_indptr, t.kv_indices, t.kv_lens)} == {np.dtype(np.int32)}


def test_upproject_split_of_a_mixed_step():
    # block size 4; in batch order: a decode at length 6, a 5-token chunk over 3 cached tokens (blocks 8, 2), a
    # 2-token chunk over 1 cached (short: absorbed at min 3), a fresh 3-token prefill (block 5, its table holding a
    # second, unused block)
    qlens, seq_lens = [1, 5, 2, 3], [6, 8, 3, 3]
    tables = [[0, 1], [8, 2], [6], [5, 7]]
    s = upproject_split(qlens, seq_lens, tables, 4, 3)
    assert s is not None
    assert s.up_seqs.tolist() == [1, 3] and s.absorbed_seqs.tolist() == [0, 2]
    # rows: decode 0, chunk 1..5, short chunk 6..7, fresh prefill 8..10
    assert s.up_rows.tolist() == [1, 2, 3, 4, 5, 8, 9, 10]
    assert s.absorbed_rows.tolist() == [0, 6, 7]
    assert s.qo_indptr.tolist() == [0, 5, 8] and s.kv_indptr.tolist() == [0, 8, 11]
    assert s.context_slots.tolist() == [32, 33, 34, 35, 8, 9, 10, 11, 20, 21, 22]
    assert s.cached_lens.tolist() == [3, 0]
    assert upproject_split(qlens, seq_lens, tables, 4, 0) is None, "0: never"
    assert upproject_split(qlens, seq_lens, tables, 4, 6) is None, "no chunk is that long"
    every = upproject_split(qlens, seq_lens, tables, 4, 1)  # 1: every chunk of 2+ tokens; a decode row never
    assert every is not None and every.up_seqs.tolist() == [1, 2, 3] and every.absorbed_rows.tolist() == [0]
    with pytest.raises(ValueError, match="mla_upproject_min_tokens must be >= 0"):
        upproject_split(qlens, seq_lens, tables, 4, -1)


def test_decode_page_table_from_the_runners_graph_layout():
    # the model runner's CUDA-graph path builds (indptr, indices, last page length); MLA needs context lengths
    lens = np.array([1, 16, 17, 33], dtype=np.int64)
    flat = np.array([5, 6, 0, 8, 1, 2, 3], dtype=np.int32)
    n_blocks = np.array([1, 1, 2, 3], dtype=np.int64)
    t = decode_page_table(*paged_kv_layout_flat(lens, flat, n_blocks, 16), 16)
    assert t.qo_indptr.tolist() == [0, 1, 2, 3, 4]
    assert t.kv_indptr.tolist() == [0, 1, 2, 4, 7]
    assert t.kv_indices.tolist() == [5, 6, 0, 8, 1, 2, 3]
    assert t.kv_lens.tolist() == [1, 16, 17, 33]


def test_steps_that_could_overflow_flashinfers_mla_plan_are_refused_by_name():
    # 16 heads: decodes pack 16 rows each, in tiles of 64 (one each); a step averaging more than 64 rows per
    # sequence is tiled by 128 (the 16-token chunk's 256 rows: 2 tiles); plus one kv split per cluster at most
    assert mla_work_bound([1] * 5, 16) == 5 + 256
    assert mla_work_bound([16, 1, 1], 16) == 2 + 1 + 1 + 256
    check_mla_work([16384], 16)  # the engine's default token budget at DeepSeek-V2-Lite's 16 heads: 2048 tiles
    check_mla_work([1] * 1024, 16)  # 1024 decodes
    check_mla_work([4096] * 16, 16)  # bench/mla_micro's longest prefill: 8192 tiles
    with pytest.raises(ValueError, match="lower --max-num-batched-tokens"):
        check_mla_work([16384], 128)  # DeepSeek-V3's 128 heads on one rank: 16384 tiles


def test_engine_limits_that_could_overflow_the_plan_are_refused_at_start():
    check_mla_budget(16384, 1024, 16)  # bench/offline.py's limits at DeepSeek-V2-Lite's 16 heads
    check_mla_budget(2048, 256, 128)  # DeepSeek-V3's 128 heads on one rank at the engine's default limits
    with pytest.raises(ValueError, match=r"lower --max-num-batched-tokens \(at most 7936 with max_num_seqs 256\)"):
        check_mla_budget(16384, 256, 128)
    check_mla_budget(7936, 256, 128)  # what the message names fits


def test_latent_backends_are_selected_for_latent_models():
    assert select_backend_class("auto", torch.device("cpu"), latent=True) is TorchMLAAttention
    assert select_backend_class("torch", torch.device("cpu"), latent=True) is TorchMLAAttention
    with pytest.raises(ValueError, match="needs a CUDA device"):
        select_backend_class("flashinfer", torch.device("cpu"), latent=True)


def _direct(q_lat, q_rope, rows, first_pos, scale):
    """Attention of the queries at positions first_pos.. over `rows` [S, WIDTH], straight from the definition."""
    q = torch.cat((q_lat, q_rope), dim=-1).double()  # [n, H, W]
    out = torch.empty(q.shape[0], HEADS, RANK, dtype=torch.float64)
    for i in range(q.shape[0]):
        keys = rows[: first_pos + i + 1].double()  # causal: this token and everything before it
        for h in range(HEADS):
            w = torch.softmax(keys @ q[i, h] * scale, dim=0)
            out[i, h] = w @ keys[:, :RANK]
    return out


def test_torch_mla_matches_direct_attention_over_shuffled_pages():
    gen = torch.Generator().manual_seed(0)
    cached, new = [0, 9, 6, 13], [7, 4, 1, 1]  # fresh prefill, chunk over a cache, two decodes
    perm = torch.randperm(40, generator=gen).tolist()
    tables, at = [], 0
    for c, n in zip(cached, new, strict=True):
        k = -(-(c + n) // BLOCK)
        tables.append(perm[at : at + k])
        at += k
    rows = [torch.randn(c + n, WIDTH, generator=gen) for c, n in zip(cached, new, strict=True)]
    pool = torch.zeros(40, BLOCK, WIDTH)
    for table, r, c in zip(tables, rows, cached, strict=True):
        for p in range(c):  # the cached prefix is in the pool already
            pool[table[p // BLOCK], p % BLOCK] = r[p]
    scale = 0.3
    attn = TorchMLAAttention(HEADS, 1, WIDTH, scale, BLOCK, kv_lora_rank=RANK)
    assert attn.kv_cache_shape(40) == (40, BLOCK, WIDTH)
    batch = ForwardBatch(
        [ScheduledSeq(f"s{i}", [0] * n, c, tables[i], True) for i, (c, n) in enumerate(zip(cached, new, strict=True))]
    )
    t = sum(new)
    q_lat, q_rope = torch.randn(t, HEADS, RANK, generator=gen), torch.randn(t, HEADS, ROPE, generator=gen)
    new_rows = torch.cat([r[c:] for r, c in zip(rows, cached, strict=True)])
    attn.begin_step(AttentionMetadata.from_batch(batch, BLOCK))
    out = attn.forward_mla(0, q_lat, q_rope, new_rows[:, :RANK], new_rows[:, RANK:], pool)
    assert out.shape == (t, HEADS, RANK)
    start = 0
    for i, (c, n) in enumerate(zip(cached, new, strict=True)):
        for p in range(c + n):  # the whole context is in the pool now, one row per token
            assert torch.equal(pool[tables[i][p // BLOCK], p % BLOCK], rows[i][p]), f"seq {i} position {p}"
        expected = _direct(q_lat[start : start + n], q_rope[start : start + n], rows[i], c, scale)
        err = (out[start : start + n].double() - expected).abs().max().item()
        assert err < 1e-5, f"sequence {i} ({c} cached + {n} new): max abs error {err:.2e}"
        start += n


@pytest.mark.parametrize("kind", DEEPSEEK_KINDS)
def test_random_deepseek_model_runs_on_the_latent_pool(kind):
    """The random weights bench/offline.py and the GPU tests load have every tensor DeepSeek's loader takes (it
    refuses missing and unused ones by name), for q_lora on and off and sigmoid routing's bias."""
    from kubellm.engine.config import EngineConfig
    from kubellm.engine.model_config import ModelConfig
    from kubellm.engine.model_runner import ModelRunner
    from kubellm.engine.random_model import random_loaded_model

    config = ModelConfig.from_hf_config(tiny_hf_config(kind).to_dict())
    runner = ModelRunner(random_loaded_model(config, torch.float32, "cpu"), EngineConfig(device="cpu"))
    runner.allocate_kv_cache(4)
    assert isinstance(runner.attn, TorchMLAAttention)
    assert [tuple(t.shape) for t in runner.kv_caches] == [(4, 16, 40)] * 3
    assert runner.kv_cache_bytes_per_block() == 3 * 16 * 40 * 4  # one 40-wide float32 row per token and layer
    ids = list(range(3, 23))
    logits = runner.logits(ForwardBatch([ScheduledSeq("r", ids, 0, [0, 1], True)]))
    assert logits.shape == (1, config.vocab_size) and bool(torch.isfinite(logits).all())


def _mla_layer_and_step(kind: str, cached: list[int], new: list[int], seed: int):
    """DeepSeek's attention layer of a tiny config with random weights, a pool holding random cached latents in
    shuffled blocks, and one step's batch (sequence i: cached[i] tokens in the pool, new[i] computed now)."""
    from kubellm.engine.model_config import ModelConfig
    from kubellm.engine.models.deepseek import MLAttention

    c = ModelConfig.from_hf_config(tiny_hf_config(kind).to_dict())
    gen = torch.Generator().manual_seed(seed)
    layer = MLAttention(c, torch.float32, torch.device("cpu"))
    for p in layer.parameters():
        p.data = torch.randn(p.shape, generator=gen) * 0.3
    width = c.kv_lora_rank + c.qk_rope_head_dim
    perm = torch.randperm(48, generator=gen).tolist()
    tables, at = [], 0
    for k, n in zip(cached, new, strict=True):
        pages = -(-(k + n) // BLOCK)
        tables.append(perm[at : at + pages])
        at += pages
    pool = torch.randn(48, BLOCK, width, generator=gen)
    batch = ForwardBatch(
        [ScheduledSeq(f"s{i}", [0] * n, k, tables[i], True) for i, (k, n) in enumerate(zip(cached, new, strict=True))]
    )
    meta = AttentionMetadata.from_batch(batch, BLOCK)
    t = sum(new)
    x = torch.randn(t, c.hidden_size, generator=gen)
    freqs = meta.positions.float()[:, None] * torch.rand(c.qk_rope_head_dim // 2, generator=gen)[None, :]
    return c, layer, pool, meta, x, freqs.cos()[:, None, :], freqs.sin()[:, None, :]


@pytest.mark.parametrize("kind", DEEPSEEK_KINDS)
def test_upprojected_prefill_equals_absorbed_in_a_mixed_step(kind):
    """One step, rows interleaved: a decode, a chunk over a cached prefix ending mid-block, a short chunk (absorbed
    at min 4), a fresh prefill, another decode. Up-projecting the long chunks gives the absorbed path's output and
    writes the same latents to the same slots."""
    cached, new = [9, 6, 5, 0, 17], [1, 7, 2, 11, 1]
    c, layer, pool, meta, x, cos, sin = _mla_layer_and_step(kind, cached, new, seed=5)
    scale = c.attention_scale
    outs, pools = [], []
    for min_tokens in (0, 4):
        attn = TorchMLAAttention(
            layer.num_heads, 1, pool.shape[-1], scale, BLOCK, kv_lora_rank=c.kv_lora_rank,
            upproject_min_tokens=min_tokens,
        )  # fmt: skip
        attn.begin_step(meta)
        split = attn.mla_split
        if min_tokens:
            assert split is not None and split.plan.up_seqs.tolist() == [1, 3]
            assert split.up_rows.tolist() == [1, 2, 3, 4, 5, 6, 7, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
        else:
            assert split is None
        p = pool.clone()
        with torch.inference_mode():
            outs.append(layer(0, x, cos, sin, p, attn))
        pools.append(p)
    assert torch.equal(pools[0], pools[1]), "the new latents went to different slots"
    err = float((outs[1] - outs[0]).norm() / outs[0].norm())
    assert err < 1e-5, f"{kind}: relative L2 {err:.2e} between up-projected and absorbed"


def test_a_step_of_only_upprojected_chunks_needs_no_absorbed_plan():
    cached, new = [0, 5], [6, 9]
    c, layer, pool, meta, x, cos, sin = _mla_layer_and_step("deepseek-v2", cached, new, seed=6)
    outs = []
    for min_tokens in (0, 1):
        attn = TorchMLAAttention(
            layer.num_heads, 1, pool.shape[-1], c.attention_scale, BLOCK, kv_lora_rank=c.kv_lora_rank,
            upproject_min_tokens=min_tokens,
        )  # fmt: skip
        attn.begin_step(meta)
        assert (attn.mla_split is None) == (min_tokens == 0)
        if min_tokens:
            assert attn.mla_split.absorbed_rows is None
        with torch.inference_mode():
            outs.append(layer(0, x, cos, sin, pool.clone(), attn))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
