"""Paged execution is equivalent to one full pass: chunked prefill, decode steps, batching of mixed sequences,
shuffled block ids. The torch backend reads every cached token back from the paged cache, so a wrong slot
or block table shows up here as wrong logits."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import TINY_VOCAB, full_pass_logits, make_runner, max_rel_err

from kubellm.engine.attention import kv_cache_shape
from kubellm.engine.forward_batch import ForwardBatch, ScheduledSeq
from kubellm.engine.loader import load_model

TOL = 1e-5
BLOCK = 4


@pytest.fixture(scope="module")
def qwen3_runner(tiny_model_dir):
    return make_runner(load_model(tiny_model_dir("qwen3")), num_blocks=200, block_size=BLOCK)


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, TINY_VOCAB) for _ in range(n)]


def _blocks(seed: int, n_tokens: int, pool: int = 200) -> list[int]:
    """Non-contiguous, shuffled block ids."""
    return random.Random(seed).sample(range(pool), -(-n_tokens // BLOCK))


def _chunked_then_decode(runner, ids: list[int], prompt_len: int, chunk: int, blocks: list[int]) -> torch.Tensor:
    """Prefill ids[:prompt_len] in `chunk`-token steps, then feed the rest one token per step; logits of the
    last token of every step."""
    rows, pos = [], 0
    while pos < len(ids):
        n = min(chunk, prompt_len - pos) if pos < prompt_len else 1
        step = ScheduledSeq("r", ids[pos : pos + n], pos, blocks, needs_logits=True)
        rows.append(runner.logits(ForwardBatch([step]))[0])
        pos += n
    return torch.stack(rows)


def _step_ends(prompt_len: int, total: int, chunk: int) -> list[int]:
    ends = list(range(chunk, prompt_len, chunk)) + [prompt_len]
    return ends + list(range(prompt_len + 1, total + 1))


@pytest.mark.parametrize("chunk", [7, 1, 64])
def test_chunked_prefill_and_decode_equal_full_pass(qwen3_runner, chunk):
    ids = _ids(chunk, 60)
    full = full_pass_logits(qwen3_runner, ids, _blocks(99, len(ids)))
    paged = _chunked_then_decode(qwen3_runner, ids, prompt_len=45, chunk=chunk, blocks=_blocks(chunk, len(ids)))
    expected = full[[e - 1 for e in _step_ends(45, len(ids), chunk)]]
    assert paged.shape == expected.shape
    assert max_rel_err(paged, expected) < TOL


def test_batch_of_mixed_sequences_equals_each_alone(qwen3_runner):
    """One step mixing fresh prefills, a prefill chunk over cached context, and decodes of different lengths;
    needs_logits rows come back in batch order."""
    runner = qwen3_runner
    specs = [  # (seed, cached tokens before the step, new tokens this step, needs_logits)
        (1, 0, 13, True),
        (2, 30, 1, True),
        (3, 17, 9, True),
        (4, 5, 1, True),
        (5, 0, 6, False),  # a prefill chunk that does not sample
        (6, 41, 1, True),
    ]
    pool = random.Random(7).sample(range(200), 200)
    seqs, alone = [], []
    for i, (seed, cached, new, needs) in enumerate(specs):
        ids = _ids(seed, cached + new)
        blocks = pool[i * 16 : (i + 1) * 16]
        if cached:  # put the context in the cache first, in one prefill
            runner.logits(ForwardBatch([ScheduledSeq(f"s{i}", ids[:cached], 0, blocks, True)]))
        seqs.append(ScheduledSeq(f"s{i}", ids[cached:], cached, blocks, needs))
        if needs:
            alone.append(full_pass_logits(runner, ids, pool[150:166])[-1])
    batched = runner.logits(ForwardBatch(seqs))
    assert batched.shape == (len(alone), TINY_VOCAB)
    assert max_rel_err(batched, torch.stack(alone)) < TOL


def test_decode_only_batch_of_different_lengths(qwen3_runner):
    runner = qwen3_runner
    lens = [3, 16, 9, 30, 1]
    pool = random.Random(11).sample(range(200), 200)
    steps, alone = [], []
    for i, n in enumerate(lens):
        ids = _ids(100 + i, n + 1)
        blocks = pool[i * 10 : (i + 1) * 10]
        runner.logits(ForwardBatch([ScheduledSeq(f"d{i}", ids[:n], 0, blocks, False)]))
        steps.append(ScheduledSeq(f"d{i}", ids[n:], n, blocks, True))
        alone.append(full_pass_logits(runner, ids, pool[180:190])[-1])
    batch = ForwardBatch(steps)
    assert batch.is_decode_only
    assert max_rel_err(runner.logits(batch), torch.stack(alone)) < TOL


def test_smollm2_chunked_prefill_and_decode(smollm2_runner, smollm2_hf_tokenizer):
    ids = smollm2_hf_tokenizer("Paged attention stores keys and values in fixed-size blocks, so that").input_ids
    ids += [1183, 4025, 3636, 2641]  # a few decode steps
    prompt_len = len(ids) - 4
    blocks = random.Random(3).sample(range(20, 160), -(-len(ids) // 16))
    full = full_pass_logits(smollm2_runner, ids)
    paged = _chunked_then_decode(smollm2_runner, ids, prompt_len, 7, blocks)
    expected = full[[e - 1 for e in _step_ends(prompt_len, len(ids), 7)]]
    assert max_rel_err(paged, expected) < 1e-4
    assert torch.equal(paged.argmax(-1), expected.argmax(-1))


def test_empty_batch_and_no_logits(qwen3_runner):
    assert qwen3_runner.logits(ForwardBatch([])).shape == (0, TINY_VOCAB)
    out = qwen3_runner.logits(ForwardBatch([ScheduledSeq("x", [5, 6, 7], 0, [0], False)]))
    assert out.shape == (0, TINY_VOCAB)


def test_kv_cache_layout_and_size(qwen3_runner):
    c = qwen3_runner.model_config
    assert len(qwen3_runner.kv_caches) == c.num_hidden_layers
    assert qwen3_runner.kv_caches[0].shape == kv_cache_shape(200, BLOCK, c.num_key_value_heads, c.head_dim)
    assert qwen3_runner.kv_caches[0].shape == (200, 2, BLOCK, 2, 24)
    expected = c.num_hidden_layers * 2 * BLOCK * c.num_key_value_heads * c.head_dim * 4
    assert qwen3_runner.kv_cache_bytes_per_block() == expected


def test_bad_block_tables_raise(qwen3_runner):
    with pytest.raises(ValueError, match="outside the pool"):
        qwen3_runner.logits(ForwardBatch([ScheduledSeq("x", [5, 6], 0, [200], True)]))
    with pytest.raises(ValueError, match="cannot hold"):
        qwen3_runner.logits(ForwardBatch([ScheduledSeq("x", [5] * 9, 0, [1, 2], True)]))
