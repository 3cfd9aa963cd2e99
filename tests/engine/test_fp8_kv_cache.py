"""FP8 KV cache (--kv-cache-dtype fp8) on the CPU torch path, with the embedded SmolLM2: K/V stored as e4m3 and
read back by every later chunk and decode step. The GGUF has no KV scales, so they are 1.0, or computed at start
with --calculate-kv-scales.

Stated tolerance: teacher-forced logits over 64 positions (prefilled in 16-token chunks, so 48 of them attend to
FP8 keys and values read from the cache) within a relative L2 of 0.1 of the full-precision cache's, per prompt
(measured with scales 1.0: 0.04 to 0.08), and the same top-1 token at >= 90% of positions. Greedy text agrees for
the first 16 tokens on at least 6 of 8 prompts with computed scales (measured 6/8). With scales 1.0 only 2 of 8
agree that long on this 135M model (first divergences at tokens 6-15): 46% of layer 0's values are below e4m3's
smallest normal (1/64) there, so it is not asserted."""

from __future__ import annotations

import pytest
import torch
from greedy_reference import engine_greedy

from kubellm.engine.attention import AttentionMetadata
from kubellm.engine.config import EngineConfig
from kubellm.engine.forward_batch import ForwardBatch, ScheduledSeq
from kubellm.engine.llm_engine import LLMEngine
from kubellm.engine.loader import load_model
from kubellm.engine.model_runner import ModelRunner

TEXTS = [
    "The history of the Roman Empire spans many centuries, from the founding of the city to the fall of",
    "To bake a loaf of bread you need flour, water, salt and yeast. First mix the dry ingredients, then",
    "Python is a programming language that emphasizes readability. Its standard library is large, and",
    "The mitochondria is the powerhouse of the cell. It produces energy in the form of ATP through a",
    "In 1969, astronauts landed on the Moon for the first time. The Apollo 11 mission was commanded by",
    "A good night's sleep is important for health. Adults should aim for seven to nine hours each night,",
    "The stock market can be volatile. Investors often diversify their portfolios across stocks, bonds and",
    "Mount Everest is the highest mountain above sea level, located in the Himalayas on the border between",
]
POSITIONS, CHUNK = 64, 16


@pytest.fixture(scope="module")
def prompts(smollm2_loaded) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(smollm2_loaded.tokenizer_info.tokenizer_json)
    return [tok.encode(t).ids for t in TEXTS]


def _engine(loaded, kv_cache_dtype: str, calculate_kv_scales: bool = False) -> LLMEngine:
    config = EngineConfig(
        device="cpu", kv_cache_dtype=kv_cache_dtype, calculate_kv_scales=calculate_kv_scales, num_gpu_blocks_override=64
    )
    return LLMEngine(config, loaded=loaded)


@pytest.fixture(scope="module")
def engines(smollm2_loaded):
    return {
        "auto": _engine(smollm2_loaded, "auto"),
        "fp8": _engine(smollm2_loaded, "fp8"),
        "fp8-computed": _engine(smollm2_loaded, "fp8", calculate_kv_scales=True),
    }


def chunked_logits(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    """Logits at every position, prefilled CHUNK tokens at a time into blocks 0.. of the runner's pool."""
    blocks = list(range(-(-len(ids) // runner.block_size)))
    out = []
    with torch.inference_mode():
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK]
            meta = AttentionMetadata.from_batch(ForwardBatch([ScheduledSeq("t", chunk, start, blocks, True)]), 16)
            runner.attn.begin_step(meta)
            hidden = runner.model(torch.tensor(chunk), meta.positions, runner.kv_caches, runner.attn)
            out.append(runner.model.compute_logits(hidden))
    return torch.cat(out)


def test_fp8_kv_cache_is_stored_as_e4m3_with_unit_scales(engines):
    runner = engines["fp8"].runner
    assert all(cache.dtype == torch.float8_e4m3fn for cache in runner.kv_caches)
    assert runner.attn.k_scales == [1.0] * len(runner.kv_caches) == runner.attn.v_scales
    assert engines["auto"].runner.kv_caches[0].dtype == torch.float32
    computed = engines["fp8-computed"].runner.attn
    assert all(0 < s < 1 for s in computed.k_scales + computed.v_scales)  # these activations are far below 448
    assert len(set(computed.v_scales)) > 1  # one per layer


def test_teacher_forced_logits_within_tolerance_of_full_precision_kv(engines, prompts):
    agree: dict[str, list[float]] = {"fp8": []}  # the default scales 1.0 (computed scales: the greedy test)
    for p in prompts:
        ids = (p * (POSITIONS // len(p) + 1))[:POSITIONS]
        ref = chunked_logits(engines["auto"].runner, ids)
        for kind, rows in agree.items():
            ours = chunked_logits(engines[kind].runner, ids)
            err = float((ours - ref).norm() / ref.norm())
            assert 0 < err < 0.1, f"{kind}: rel L2 {err:.4f} for prompt {p[:8]}..."
            rows.append(float((ours.argmax(-1) == ref.argmax(-1)).float().mean()))
    for kind, rows in agree.items():
        assert sum(rows) / len(rows) >= 0.9, (kind, rows)


def test_greedy_text_agrees_for_16_tokens_on_most_prompts(engines, prompts):
    ref = engine_greedy(engines["auto"], prompts, 16)
    ours = engine_greedy(engines["fp8-computed"], prompts, 16)
    same = sum(a == b for a, b in zip(ours, ref, strict=True))
    assert same >= 6, f"{same}/8 prompts agree for 16 tokens:\n ours={ours}\n ref ={ref}"


def test_fp8_pool_holds_twice_the_tokens_of_bf16_in_the_same_bytes(tiny_model_dir):
    loaded = load_model(tiny_model_dir("llama"), dtype=torch.bfloat16)
    budget = 1 << 20
    blocks = {}
    for kv in ("auto", "fp8"):
        config = EngineConfig(device="cpu", dtype="bfloat16", kv_cache_dtype=kv, kv_cache_memory_bytes=budget)
        engine = LLMEngine(config, loaded=loaded)
        blocks[kv] = engine.kv.num_blocks
        assert engine.runner.kv_caches[0].dtype == (torch.float8_e4m3fn if kv == "fp8" else torch.bfloat16)
        c = loaded.config
        per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * (1 if kv == "fp8" else 2)
        assert blocks[kv] == budget // (per_token * 16)
    assert blocks["fp8"] == 2 * blocks["auto"]


def test_fp8_kv_refused_for_mla_models(tiny_model_dir):
    loaded = load_model(tiny_model_dir("deepseek-v3"))
    with pytest.raises(ValueError, match="kv-cache-dtype fp8 is not supported for MLA"):
        ModelRunner(loaded, EngineConfig(device="cpu", kv_cache_dtype="fp8"))


def _rows_of_slots(slots: list[int], block_size: int) -> tuple[list[int], list[int]]:
    """Rows of a [blocks, 2, block_size, Hkv, D] cache viewed as [blocks * 2 * block_size, Hkv, D]: slot s of block
    b = s // block_size at offset o holds its K in row (2b) * block_size + o and its V one block_size later."""
    k_rows = [2 * (s // block_size) * block_size + s % block_size for s in slots]
    return k_rows, [r + block_size for r in k_rows]


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16])
def test_write_kv_rows_puts_each_token_at_its_slot_and_nothing_else(dtype):
    """The flashinfer backend's KV write (whatever the device; CUDA has no float8 index_copy_, so FP8 caches go
    through uint8 views): each token's K and V land in the rows of its slot, bit for bit, every other row untouched."""
    from kubellm.engine.attention.base import kv_cache_shape, write_kv_rows
    from kubellm.engine.loader.quantization import to_fp8

    g = torch.Generator().manual_seed(3)
    blocks, bs, hkv, d = 5, 4, 2, 8
    cache = torch.randn(kv_cache_shape(blocks, bs, hkv, d), generator=g).to(dtype)
    before = cache.clone()
    slots = [0, 7, 13, 19, 6]  # blocks 0, 1, 3, 4, 1 (out of order, two in one block)
    k32, v32 = torch.randn(len(slots), hkv, d, generator=g) * 3, torch.randn(len(slots), hkv, d, generator=g)
    k, v = (to_fp8(k32, 0.5), to_fp8(v32, 2.0)) if dtype == torch.float8_e4m3fn else (k32.to(dtype), v32.to(dtype))
    k_rows, v_rows = _rows_of_slots(slots, bs)
    flat = cache.view(-1, hkv, d)
    write_kv_rows(flat, torch.tensor(k_rows), k)
    write_kv_rows(flat, torch.tensor(v_rows), v)
    as_bytes = (lambda t: t.view(torch.uint8)) if dtype.itemsize == 1 else (lambda t: t.view(torch.int16))
    for i, s in enumerate(slots):
        block, offset = divmod(s, bs)
        assert torch.equal(as_bytes(cache[block, 0, offset]), as_bytes(k[i])), (s, "K")
        assert torch.equal(as_bytes(cache[block, 1, offset]), as_bytes(v[i])), (s, "V")
    written = torch.zeros(blocks, 2, bs, dtype=torch.bool)
    for s in slots:
        written[s // bs, :, s % bs] = True
    assert torch.equal(as_bytes(cache[~written]), as_bytes(before[~written]))


def test_write_kv_rows_refuses_values_of_another_dtype():
    from kubellm.engine.attention.base import write_kv_rows

    cache = torch.zeros(8, 2, 4, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"bfloat16.*float8_e4m3fn cache"):
        write_kv_rows(cache, torch.tensor([1]), torch.ones(1, 2, 4, dtype=torch.bfloat16))
