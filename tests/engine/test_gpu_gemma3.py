"""Gemma 3 on CUDA: flashinfer with per-layer sliding windows against the torch backend (GPU only; skipped without
CUDA or flashinfer).

- attention level: one FlashInferAttention serving a sliding layer (window 32) and a global layer, head_dim 256
  with 4 query heads on 1 KV head (Gemma 3 270M's shape), against the torch reference in float32, for prefill,
  chunked prefill over cached keys mixed with decodes, and decode;
- model level: Gemma 3 270M (the real GGUF when `gemma3-270m` resolves here, else random weights of its shape) in
  bf16 through flashinfer (CUDA-graph decode) and through the torch backend, both against a float32 torch-backend
  run of the same weights, teacher-forced over a 600-token prompt (past the 512-token window) fed in prefill chunks
  and then 40 decode steps: flashinfer must be as close to float32 as torch's own bf16 run (x1.5 + 0.01), and
  agree on the argmax wherever the float32 top-2 gap exceeds 0.1.
First run builds flashinfer kernels for head_dim 256 with and without a window (prefill FA2, used for decode too
since a KV head serves 4 query heads).
"""

from __future__ import annotations

import pytest
import torch

from kubellm.engine.attention import AttentionMetadata, TorchPagedAttention, kv_cache_shape
from kubellm.engine.config import EngineConfig
from kubellm.engine.forward_batch import ForwardBatch, ScheduledSeq

pytestmark = pytest.mark.gpu

BLOCK, HQ, HKV, D, WINDOW = 16, 4, 1, 256, 32
PROMPT, PREFILL_CHUNK, DECODES = 600, 256, 40


def _flashinfer_cls():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import flashinfer  # noqa: F401  (a GPU machine without flashinfer fails here, never skips)

    from kubellm.engine.attention.flashinfer_backend import FlashInferAttention

    return FlashInferAttention


@pytest.mark.parametrize(
    "cached,new",
    [([0, 0], [100, 40]), ([70, 5, 40], [20, 1, 1]), ([45, 90, 3, 33], [1, 1, 1, 1])],
    ids=["prefill", "chunked+decode", "decode"],
)
def test_per_layer_windows_match_reference(cached, new):
    fi_cls = _flashinfer_cls()
    gen = torch.Generator().manual_seed(sum(cached) + sum(new))
    num_blocks = 64
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, at = [], 0
    for c, n in zip(cached, new, strict=True):
        k = -(-(c + n) // BLOCK)
        tables.append(perm[at : at + k])
        at += k
    lens = list(zip(cached, new, strict=True))
    batch = ForwardBatch([ScheduledSeq(f"s{i}", [0] * n, c, tables[i], True) for i, (c, n) in enumerate(lens)])
    meta = AttentionMetadata.from_batch(batch, BLOCK, "cuda")
    windows = [WINDOW, None]
    fi = fi_cls(HQ, HKV, D, D**-0.5, BLOCK, dtype=torch.bfloat16, device="cuda", sliding_window=windows)
    ref = TorchPagedAttention(HQ, HKV, D, D**-0.5, BLOCK, sliding_window=windows)
    t = sum(new)
    for layer in (0, 1):
        cache = torch.randn(kv_cache_shape(num_blocks, BLOCK, HKV, D), generator=gen).to("cuda", torch.bfloat16)
        q, k, v = (torch.randn(t, h, D, generator=gen).to("cuda", torch.bfloat16) for h in (HQ, HKV, HKV))
        fi_cache, ref_cache = cache.clone(), cache.float()
        fi.begin_step(meta)
        out = fi.forward(layer, q, k, v, fi_cache)
        ref.begin_step(meta)
        expected = ref.forward(layer, q.float(), k.float(), v.float(), ref_cache)
        torch.cuda.synchronize()
        assert torch.equal(fi_cache.float(), ref_cache), "K/V written to different slots"
        err = (out.float() - expected).abs().max().item()
        assert err < 2e-2, f"layer {layer} (window {windows[layer]}): max abs error {err:.3e}"


# ---- the whole model -----------------------------------------------------------------------------------------


def _gemma3_270m_random():
    """Gemma 3 270M's shapes and layer pattern with random weights (rounded to bf16, so every run loads the same
    numbers), and a synthetic tokenizer."""
    from kubellm.engine.loader.loaded import LoadedModel
    from kubellm.engine.model_config import ModelConfig, gemma3_layer_types
    from kubellm.engine.random_model import synthetic_tokenizer_info

    c = ModelConfig(
        architecture="Gemma3ForCausalLM", vocab_size=262144, hidden_size=640, intermediate_size=2048,
        num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256, rms_norm_eps=1e-6,
        rope_theta=1_000_000.0, max_position_embeddings=32768, tie_word_embeddings=True, qk_norm=True,
        bos_token_id=2, eos_token_ids=[1], sliding_window=512, layer_types=gemma3_layer_types(18),
        hidden_act="gelu_pytorch_tanh", query_pre_attn_scalar=256.0, rope_local_theta=10_000.0,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16).float()

    w = {"model.embed_tokens.weight": rand(c.vocab_size, c.hidden_size, std=0.05), "model.norm.weight": rand(640)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        for n in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ):
            w[f"{p}.{n}.weight"] = rand(640, std=0.3)
        w[f"{p}.self_attn.q_norm.weight"] = rand(256, std=0.3)
        w[f"{p}.self_attn.k_norm.weight"] = rand(256, std=0.3)
        w[f"{p}.self_attn.q_proj.weight"] = rand(4 * 256, 640)
        w[f"{p}.self_attn.k_proj.weight"] = rand(256, 640)
        w[f"{p}.self_attn.v_proj.weight"] = rand(256, 640)
        w[f"{p}.self_attn.o_proj.weight"] = rand(640, 4 * 256)
        w[f"{p}.mlp.gate_proj.weight"] = rand(2048, 640)
        w[f"{p}.mlp.up_proj.weight"] = rand(2048, 640)
        w[f"{p}.mlp.down_proj.weight"] = rand(640, 2048)
    return LoadedModel(c, w, synthetic_tokenizer_info(c.vocab_size), name="random-gemma3-270m")


@pytest.fixture(scope="module")
def gemma3_loaded():
    _flashinfer_cls()
    from kubellm.builtin_models import GEMMA3_270M, BuiltinModelError, builtin_model_path
    from kubellm.engine.loader import load_model

    try:
        loaded = load_model(builtin_model_path(GEMMA3_270M))
        # bf16-rounded weights for every run, so runs differ in arithmetic only
        loaded.weights = {k: v.to(torch.bfloat16).float() for k, v in loaded.weights.items()}
        return loaded
    except BuiltinModelError:
        return _gemma3_270m_random()


def _runner(loaded, backend: str, dtype: str):
    from kubellm.engine.model_runner import ModelRunner

    cfg = EngineConfig(
        device="cuda", dtype=dtype, attention_backend=backend, max_num_seqs=4, max_num_batched_tokens=PREFILL_CHUNK,
        max_model_len=1024,
    )  # fmt: skip
    runner = ModelRunner(loaded, cfg)
    runner.allocate_kv_cache(-(-(PROMPT + DECODES) // 16) + 4)
    return runner


def _teacher_forced(runner, ids: list[int]) -> torch.Tensor:
    """Logits (float32, CPU) at the end of each prefill chunk and at every decode step."""
    blocks = list(range(-(-len(ids) // runner.block_size)))
    rows, pos = [], 0
    while pos < len(ids):
        n = min(PREFILL_CHUNK, PROMPT - pos) if pos < PROMPT else 1
        batch = ForwardBatch([ScheduledSeq("r", ids[pos : pos + n], pos, blocks, True)])
        rows.append(runner.logits(batch)[0].float().cpu())
        pos += n
    return torch.stack(rows)


def test_gemma3_flashinfer_matches_torch_backend(gemma3_loaded):
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(300, 200_000, (PROMPT + DECODES,), generator=gen).tolist()
    fi = _runner(gemma3_loaded, "flashinfer", "bfloat16")
    assert fi.attn.name == "flashinfer" and fi.attn.windows == [512, None] and fi._graphs
    ref32 = _teacher_forced(_runner(gemma3_loaded, "torch", "float32"), ids)
    torch16 = _teacher_forced(_runner(gemma3_loaded, "torch", "bfloat16"), ids)
    fi16 = _teacher_forced(fi, ids)
    assert fi.graph_replays >= DECODES - 1, "decode steps did not replay the CUDA graphs"

    def rel(x: torch.Tensor) -> float:
        return ((x - ref32).norm(dim=-1) / ref32.norm(dim=-1)).max().item()

    top2 = ref32.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) > 0.1
    agree = (fi16.argmax(-1) == ref32.argmax(-1))[decided].float().mean().item()
    print(
        f"{gemma3_loaded.name}: relative L2 vs float32: flashinfer bf16 {rel(fi16):.4f}, "
        f"torch bf16 {rel(torch16):.4f}; argmax agreement {agree:.3f} on the {int(decided.sum())} of "
        f"{len(ref32)} rows with a top-2 gap > 0.1"
    )
    assert rel(fi16) <= 1.5 * rel(torch16) + 0.01
    assert agree >= 0.95
