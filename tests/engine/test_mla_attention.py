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
    upproject_temp_bytes,
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
    s = upproject_split(qlens, seq_lens, tables, 4, 3, 11)  # a bound of 11 context tokens: both chunks (8 + 3)
    assert s is not None
    assert s.up_seqs.tolist() == [1, 3] and s.absorbed_seqs.tolist() == [0, 2]
    # rows: decode 0, chunk 1..5, short chunk 6..7, fresh prefill 8..10
    assert s.up_rows.tolist() == [1, 2, 3, 4, 5, 8, 9, 10]
    assert s.absorbed_rows.tolist() == [0, 6, 7]
    assert s.qo_indptr.tolist() == [0, 5, 8] and s.kv_indptr.tolist() == [0, 8, 11]
    assert s.context_slots.tolist() == [32, 33, 34, 35, 8, 9, 10, 11, 20, 21, 22]
    assert s.cached_lens.tolist() == [3, 0]
    assert upproject_split(qlens, seq_lens, tables, 4, 0, 100) is None, "0: never"
    assert upproject_split(qlens, seq_lens, tables, 4, 6, 100) is None, "no chunk is that long"
    every = upproject_split(qlens, seq_lens, tables, 4, 1, 100)  # 1: every chunk of 2+ tokens; a decode row never
    assert every is not None and every.up_seqs.tolist() == [1, 2, 3] and every.absorbed_rows.tolist() == [0]
    with pytest.raises(ValueError, match="mla_upproject_min_tokens must be >= 0"):
        upproject_split(qlens, seq_lens, tables, 4, -1, 100)
    with pytest.raises(ValueError, match="the up-projected context bound must be >= 0"):
        upproject_split(qlens, seq_lens, tables, 4, 3, -1)


def test_upproject_split_holds_at_most_the_context_bound():
    # the step above: candidates at min 2 are the 5-token chunk over 3 (context 8), the 2-token chunk over 1
    # (context 3) and the fresh 3-token prefill (context 3), in batch order
    qlens, seq_lens = [1, 5, 2, 3], [6, 8, 3, 3]
    tables = [[0, 1], [8, 2], [6], [5, 7]]
    s = upproject_split(qlens, seq_lens, tables, 4, 2, 10)  # 8 fits; 8 + 3 does not; 8 + 3 (the third) does not
    assert s is not None and s.up_seqs.tolist() == [1] and s.absorbed_seqs.tolist() == [0, 2, 3]
    assert s.up_rows.tolist() == [1, 2, 3, 4, 5] and s.absorbed_rows.tolist() == [0, 6, 7, 8, 9, 10]
    assert s.kv_indptr.tolist() == [0, 8] and s.context_slots.tolist() == [32, 33, 34, 35, 8, 9, 10, 11]
    s = upproject_split(qlens, seq_lens, tables, 4, 2, 6)  # the first is past the bound alone: absorbed, and the
    assert s is not None and s.up_seqs.tolist() == [2, 3]  # later, shorter ones taken (3 + 3 = 6 fits exactly)
    assert s.cached_lens.tolist() == [1, 0] and s.context_slots.tolist() == [24, 25, 26, 20, 21, 22]
    s = upproject_split(qlens, seq_lens, tables, 4, 2, 5)  # 3 fits, 3 + 3 does not
    assert s is not None and s.up_seqs.tolist() == [2] and s.absorbed_rows.tolist() == [0, 1, 2, 3, 4, 5, 8, 9, 10]
    assert upproject_split(qlens, seq_lens, tables, 4, 2, 2) is None, "no candidate fits: the whole step absorbed"
    assert upproject_split(qlens, seq_lens, tables, 4, 2, 0) is None


@pytest.mark.parametrize("seed", range(6))
def test_upproject_split_of_random_steps_respects_the_bound_in_batch_order(seed):
    """Random steps (decodes, chunks over cached prefixes, fresh prefills) and bounds: the up-projected contexts
    sum to at most the bound; every candidate left absorbed would have passed the bound at its turn (first fit in
    batch order); the rows of the two paths partition the step, each in increasing order; each up sequence's
    slots are its context's, position by position, through its block table."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 24))
    qlens = [int(rng.choice([1, int(rng.integers(2, 40))])) for _ in range(n)]
    cached = [int(rng.integers(0, 60)) for _ in range(n)]
    seq_lens = [c + q for c, q in zip(cached, qlens, strict=True)]
    block = 4
    perm = rng.permutation(2000).tolist()
    tables, at = [], 0
    for length in seq_lens:
        pages = -(-length // block) + int(rng.integers(0, 2))  # sometimes a spare block at the end
        tables.append(perm[at : at + pages])
        at += pages
    min_tokens, bound = int(rng.integers(1, 10)), int(rng.integers(0, 200))
    s = upproject_split(qlens, seq_lens, tables, block, min_tokens, bound)
    candidates = [i for i in range(n) if qlens[i] >= max(min_tokens, 2)]
    held, taken = 0, []
    for i in candidates:  # the rule, written plainly
        if held + seq_lens[i] <= bound:
            taken.append(i)
            held += seq_lens[i]
    if not taken:
        assert s is None
        return
    assert s is not None and s.up_seqs.tolist() == taken
    assert s.absorbed_seqs.tolist() == [i for i in range(n) if i not in taken]
    assert int(s.kv_indptr[-1]) == sum(seq_lens[i] for i in taken) <= bound
    starts = np.concatenate(([0], np.cumsum(qlens)))
    up_rows = [r for i in taken for r in range(starts[i], starts[i + 1])]
    assert s.up_rows.tolist() == up_rows
    assert s.absorbed_rows.tolist() == [r for r in range(int(starts[-1])) if r not in set(up_rows)]
    slots = [tables[i][p // block] * block + p % block for i in taken for p in range(seq_lens[i])]
    assert s.context_slots.tolist() == slots
    assert s.cached_lens.tolist() == [cached[i] for i in taken]
    assert s.qo_indptr.tolist() == np.concatenate(([0], np.cumsum([qlens[i] for i in taken]))).tolist()


def test_upprojected_temporaries_grow_with_the_bound_and_the_heads():
    v2_lite = dict(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, elem_bytes=2)
    # per context token: latent row 576 + a copy of its latent 512 + 16 heads x (kv_b out 256 + keys 192 + v 128)
    assert upproject_temp_bytes(1, 16, **v2_lite) == (576 + 512 + 16 * 576) * 2 == 20608
    assert upproject_temp_bytes(32768, 16, **v2_lite) == 32768 * 20608  # the auto bound at a 16384-token budget
    assert upproject_temp_bytes(0, 16, **v2_lite) == 0
    # DeepSeek-V3 on one rank: 128 heads of the same widths
    assert upproject_temp_bytes(16384, 128, **v2_lite) == 16384 * (576 + 512 + 128 * 576) * 2
    sizes = [upproject_temp_bytes(b, h, **v2_lite) for b in (1024, 4096) for h in (8, 16, 128)]
    assert sizes[0] < sizes[1] < sizes[2] and sizes[3] < sizes[4] < sizes[5]
    assert all(small < big for small, big in zip(sizes[:3], sizes[3:], strict=True))
    with pytest.raises(ValueError, match="context_tokens must be >= 0 and num_heads >= 1"):
        upproject_temp_bytes(-1, 16, **v2_lite)


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
            upproject_min_tokens=min_tokens, upproject_max_context_tokens=100,
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
            upproject_min_tokens=min_tokens, upproject_max_context_tokens=100,
        )  # fmt: skip
        attn.begin_step(meta)
        assert (attn.mla_split is None) == (min_tokens == 0)
        if min_tokens:
            assert attn.mla_split.absorbed_rows is None
        with torch.inference_mode():
            outs.append(layer(0, x, cos, sin, pool.clone(), attn))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", DEEPSEEK_KINDS)
def test_chunks_past_the_context_bound_attend_absorbed_with_the_same_result(kind):
    """Three long chunks (contexts 13, 18 and 11 tokens) and a decode in one step, all chunks candidates at min 2:
    a bound of 24 takes the first (13) and the third (13 + 11 = 24), the second falls back to absorbed beside the
    decode; the layer's output equals the all-absorbed and the unbounded up-projected layer's."""
    cached, new = [6, 10, 0, 20], [7, 8, 11, 1]
    c, layer, pool, meta, x, cos, sin = _mla_layer_and_step(kind, cached, new, seed=9)
    outs, pools = {}, []
    for name, min_tokens, bound in (("absorbed", 0, None), ("bounded", 2, 24), ("unbounded", 2, 1000)):
        attn = TorchMLAAttention(
            layer.num_heads, 1, pool.shape[-1], c.attention_scale, BLOCK, kv_lora_rank=c.kv_lora_rank,
            upproject_min_tokens=min_tokens, upproject_max_context_tokens=bound,
        )  # fmt: skip
        attn.begin_step(meta)
        split = attn.mla_split
        if name == "bounded":
            assert split is not None and split.plan.up_seqs.tolist() == [0, 2]
            assert split.plan.absorbed_seqs.tolist() == [1, 3] and int(split.plan.kv_indptr[-1]) == 24
            assert split.absorbed_rows.tolist() == list(range(7, 15)) + [26]
        elif name == "unbounded":
            assert split is not None and split.plan.up_seqs.tolist() == [0, 1, 2]
        p = pool.clone()
        with torch.inference_mode():
            outs[name] = layer(0, x, cos, sin, p, attn)
        pools.append(p)
    assert all(torch.equal(pools[0], p) for p in pools[1:]), "the new latents went to different slots"
    for name in ("bounded", "unbounded"):
        err = float((outs[name] - outs["absorbed"]).norm() / outs["absorbed"].norm())
        assert err < 1e-5, f"{kind} {name}: relative L2 {err:.2e} against absorbed"


def test_a_backend_that_may_upproject_needs_a_context_bound():
    with pytest.raises(ValueError, match="needs a bound on a step's up-projected context tokens"):
        TorchMLAAttention(HEADS, 1, WIDTH, 1.0, BLOCK, kv_lora_rank=RANK, upproject_min_tokens=4)
    with pytest.raises(ValueError, match=r"mla_upproject_max_context_tokens >= 1\), got 0"):
        TorchMLAAttention(
            HEADS, 1, WIDTH, 1.0, BLOCK, kv_lora_rank=RANK, upproject_min_tokens=4, upproject_max_context_tokens=0
        )
    TorchMLAAttention(HEADS, 1, WIDTH, 1.0, BLOCK, kv_lora_rank=RANK)  # never up-projects: no bound needed


def test_the_runner_reserves_upprojected_temporaries_growing_with_the_bound_and_the_heads():
    """The model runner's reserve for up-projected K/V (what the CUDA memory profile takes off the KV budget): the
    tiny DeepSeek-V2 config's 4 heads, kv_lora_rank 32, rope 8, nope 16, v 12 in float32 are (32 + 8) + 32 + 4 x
    (28 + 24 + 12) = 328 values, 1312 bytes per context token; 8 heads 584 values; none when never up-projecting."""
    from kubellm.engine.config import EngineConfig
    from kubellm.engine.model_config import ModelConfig
    from kubellm.engine.model_runner import ModelRunner
    from kubellm.engine.random_model import random_loaded_model

    def reserve(heads: int = 4, **settings) -> int:
        hf = tiny_hf_config("deepseek-v2").to_dict() | {"num_attention_heads": heads, "num_key_value_heads": heads}
        loaded = random_loaded_model(ModelConfig.from_hf_config(hf), torch.float32, "cpu")
        return ModelRunner(loaded, EngineConfig(device="cpu", **settings)).upproject_reserve_bytes

    assert reserve(mla_upproject_min_tokens=0) == 0, "never up-projected: nothing reserved"
    assert reserve(mla_upproject_min_tokens=4, max_num_batched_tokens=64) == 2 * 64 * 1312, "auto: 2 x the budget"
    assert reserve(mla_upproject_min_tokens=4, mla_upproject_max_context_tokens=1000) == 1000 * 1312
    assert reserve(8, mla_upproject_min_tokens=4, mla_upproject_max_context_tokens=1000) == 1000 * 584 * 4


def test_the_memory_profile_forward_attends_absorbed():
    """profile_run measures the absorbed path (its per-token temporaries are the larger); the up-projected path's
    context-sized ones are reserved on top. Inside absorbed_only a backend plans no split; after, it does again."""
    from kubellm.engine.model_runner import absorbed_only

    cached, new = [0, 5], [6, 9]
    c, layer, pool, meta, *_ = _mla_layer_and_step("deepseek-v2", cached, new, seed=6)
    attn = TorchMLAAttention(
        layer.num_heads, 1, pool.shape[-1], c.attention_scale, BLOCK, kv_lora_rank=c.kv_lora_rank,
        upproject_min_tokens=2, upproject_max_context_tokens=100,
    )  # fmt: skip
    with absorbed_only(attn):
        attn.begin_step(meta)
        assert attn.mla_split is None
    attn.begin_step(meta)
    assert attn.mla_split is not None and attn.mla_split.plan.up_seqs.tolist() == [0, 1]
    assert attn.upprojected_tokens == 15 and attn.upproject_deferred_tokens == 0
    with absorbed_only(TorchMLAAttention(layer.num_heads, 1, pool.shape[-1], 1.0, BLOCK, kv_lora_rank=8)):
        pass  # a backend that never up-projects is left as it is


def test_the_offline_prefill_probe_reports_its_upprojected_rows_and_runs_the_absorbed_ab(monkeypatch):
    """bench.offline's prefill probe on a tiny random DeepSeek-V2 engine started with up-projection (chunks of 4+):
    every row of its steps up-projected; the A/B probe on the same engine runs them all absorbed, on prompts of its
    own, and leaves the setting as it was. (CPU: the probe's CUDA synchronisations have nothing to wait for.)"""
    from bench.offline import prefill_step_ms
    from kubellm.engine.config import EngineConfig
    from kubellm.engine.llm_engine import LLMEngine
    from kubellm.engine.model_config import ModelConfig
    from kubellm.engine.random_model import random_loaded_model

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    hf = tiny_hf_config("deepseek-v2").to_dict() | {"vocab_size": 2304}  # the probe's prompts avoid ids < 1000
    loaded = random_loaded_model(ModelConfig.from_hf_config(hf), torch.float32, "cpu", name="random-ds")
    cfg = EngineConfig(model="random-ds", device="cpu", generation_config="vllm", mla_upproject_min_tokens=4)
    engine = LLMEngine(cfg, loaded=loaded)
    up = prefill_step_ms(engine, 64, 32)
    assert up["mla_upprojected_rows_per_step"] == 64 and up["tokens"] == 64 and len(up["all_ms"]) == 3
    hits = engine.stats().prefix_hits
    ab = prefill_step_ms(engine, 64, 32, absorbed=True)
    assert ab["absorbed"] and ab["mla_upprojected_rows_per_step"] == 0
    assert engine.stats().prefix_hits == hits, "the A/B's prompts were meant to be its own"
    assert engine.runner.attn.upproject_min_tokens == 4
    assert not engine.has_unfinished_requests()
