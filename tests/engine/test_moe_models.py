"""Acceptance of the [moe] issue on CPU: Qwen3-MoE, Qwen2-MoE and Mixtral, as transformers saves them, give
transformers' logits; the other checkpoint layouts (transformers 5's stacked experts, GGUF `ffn_*_exps`) load to
the same numbers; greedy generation through LLM.generate equals transformers' generate with chunked prefill,
prefix caching and a preemption in the run; tensor parallelism at 2 equals 1 with half the expert weights on each
rank."""

from __future__ import annotations

import dataclasses
import math
import random
import shutil

import pytest
import torch
from greedy_reference import assert_greedy_equal, engine_greedy, reference_greedy
from tiny_gguf import write_tiny_gguf
from tiny_models import MOE_KINDS, TINY_VOCAB, full_pass_logits, hf_logits, make_runner
from tp_parity import assert_tp2_decodes_as_tp1, cpu_tp_config

from kubellm.engine import LLM, SamplingParams
from kubellm.engine.config import EngineConfig
from kubellm.engine.llm_engine import LLMEngine
from kubellm.engine.loader import load_model
from kubellm.engine.model_config import ModelConfig, UnsupportedModelError
from kubellm.engine.models import LlamaForCausalLM
from kubellm.engine.random_model import QWEN3_30B_A3B, RandomWeights, random_loaded_model, weight_shapes

# Which layers are mixtures of experts, as each tiny config says (tiny_models.tiny_hf_config).
SPARSE_LAYERS = {"qwen3-moe": [True, False, True], "qwen2-moe": [False, True], "mixtral": [True, True]}
# The benchmark's Qwen3-30B-A3B shape, shrunk: 8 experts of width 32, 2 active.
TINY_A3B = dataclasses.replace(
    QWEN3_30B_A3B, vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
    max_position_embeddings=256, bos_token_id=1, eos_token_ids=[2],
)  # fmt: skip
_rng = random.Random(5)
IDS = [_rng.randrange(4, TINY_VOCAB) for _ in range(45)]  # one generator: 45 distinct draws, not one token 45 times


def rel_l2(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def our_logits(tiny_model_dir):
    """kind -> our teacher-forced logits of IDS from the checkpoint transformers saved (one tensor per expert)."""
    made = {}

    def get(kind: str) -> torch.Tensor:
        if kind not in made:
            runner = make_runner(load_model(tiny_model_dir(kind)), num_blocks=8)
            assert [type(layer.mlp).__name__ == "SparseMoE" for layer in runner.model.layers] == SPARSE_LAYERS[kind]
            made[kind] = full_pass_logits(runner, IDS)
        return made[kind]

    return get


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_teacher_forced_logits_equal_transformers(kind, tiny_model_dir, hf_model, our_logits):
    from safetensors import safe_open

    with safe_open(str(tiny_model_dir(kind) / "model.safetensors"), "pt") as f:  # save_pretrained's layout
        assert any(".experts.0." in k for k in f.keys()), "expected one tensor per expert in the saved checkpoint"  # noqa: SIM118
    ref = hf_logits(hf_model(kind), IDS)
    err = rel_l2(our_logits(kind), ref)
    assert err < 2e-5, f"{kind}: relative L2 error {err:.2e}"


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_stacked_expert_layout_loads_the_same_logits(kind, tiny_model_dir, hf_model, our_logits, tmp_path):
    """transformers 5's in-memory layout (experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]) saved
    as is, read lazily as a served model reads it."""
    from safetensors.torch import save_file

    src = tiny_model_dir(kind)
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, tmp_path / f.name)
    state = {k: v.contiguous() for k, v in hf_model(kind).state_dict().items()}
    assert any(k.endswith(".mlp.experts.gate_up_proj") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"))
    runner = make_runner(load_model(tmp_path, lazy=True), num_blocks=8)
    assert torch.equal(full_pass_logits(runner, IDS), our_logits(kind))


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_gguf_with_stacked_experts_loads_the_same_logits(kind, hf_model, our_logits, tmp_path, embedded_model_path):
    model = hf_model(kind)
    out = write_tiny_gguf(kind, model.config, model.state_dict(), embedded_model_path, tmp_path / "tiny.gguf")
    loaded = load_model(out)
    c = loaded.config
    assert c.architecture == model.config.architectures[0]
    assert (c.num_experts, c.num_experts_per_tok) == {"qwen3-moe": (8, 2), "qwen2-moe": (6, 3), "mixtral": (4, 2)}[kind]
    assert [c.layer_is_sparse(i) for i in range(c.num_hidden_layers)] == SPARSE_LAYERS[kind]
    ours = full_pass_logits(make_runner(loaded, num_blocks=8), IDS)
    err = rel_l2(ours, our_logits(kind))
    assert err < 1e-6, f"{kind}: GGUF vs safetensors relative L2 {err:.2e}"


def test_greedy_generate_equals_transformers_with_chunks_prefix_cache_and_preemption(tiny_model_dir, hf_model):
    path = tiny_model_dir("qwen3-moe")
    rng = random.Random(11)
    shared = [rng.randrange(4, TINY_VOCAB) for _ in range(35)]  # two full blocks and more, shared by 3 prompts
    prompts = [shared + [rng.randrange(4, TINY_VOCAB) for _ in range(n)] for n in (3, 9, 20)]
    prompts += [[rng.randrange(4, TINY_VOCAB) for _ in range(n)] for n in (5, 28)]
    max_new = 14
    refs = [reference_greedy(hf_model("qwen3-moe"), p, max_new) for p in prompts]
    longest = max(len(p) for p in prompts) + max_new
    llm = LLM(
        model=str(path), device="cpu", enable_prefix_caching=True, max_num_batched_tokens=16,
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
        assert_greedy_equal(ours, ref, ref_logits, f"qwen3-moe prompt {i}")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_tp2_equals_tp1_with_half_the_experts_on_each_rank(tiny_model_dir):
    path = tiny_model_dir("qwen2-moe")  # routed and shared experts, a dense layer
    rng = random.Random(3)
    prompts = [[rng.randrange(4, TINY_VOCAB) for _ in range(n)] for n in (4, 19, 33)]

    parity = assert_tp2_decodes_as_tp1(lambda tp: LLMEngine(cpu_tp_config(str(path), tp)), prompts, 10, "qwen2-moe")
    full, counts = parity.full_counts, parity.rank_counts
    # one sparse layer: 6 experts x (2 x 32 x 64 + 64 x 32) elements, and the 48-wide shared expert's 3 x 48 x 64
    assert full["experts"] == 6 * (2 * 32 * 64 + 64 * 32) + 3 * 48 * 64
    assert [c["experts"] for c in counts] == [full["experts"] // 2] * 2
    for rank_counts in counts:
        assert rank_counts["sharded"] * 2 == full["sharded"], (rank_counts, full)
        assert rank_counts["replicated"] == full["replicated"], (rank_counts, full)


def test_config_names_what_is_missing():
    base = dict(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(UnsupportedModelError, match="hybrid linear attention"):
        ModelConfig.from_hf_config(base | {"architectures": ["Qwen3NextForCausalLM"], "num_experts": 512})
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM with 8 experts is not supported"):
        ModelConfig.from_hf_config(base | {"architectures": ["LlamaForCausalLM"], "num_experts": 8})
    moe = base | {"architectures": ["Qwen3MoeForCausalLM"], "num_experts": 4, "moe_intermediate_size": 4}
    with pytest.raises(UnsupportedModelError, match="num_experts_per_tok=5 must be between 1 and num_experts=4"):
        ModelConfig.from_hf_config(moe | {"num_experts_per_tok": 5})
    c = ModelConfig.from_hf_config(moe | {"num_experts_per_tok": 2, "decoder_sparse_step": 2, "num_hidden_layers": 4})
    assert [c.layer_is_sparse(i) for i in range(4)] == [False, True, False, True]


def test_qwen3_30b_a3b_random_shape_is_the_published_model():
    c = QWEN3_30B_A3B
    assert (c.architecture, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (
        "Qwen3MoeForCausalLM",
        2048,
        48,
        32,
        4,
    )
    assert (c.head_dim, c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.vocab_size) == (
        128,
        128,
        8,
        768,
        151936,
    )
    assert (c.rope_theta, c.rms_norm_eps, c.tie_word_embeddings, c.norm_topk_prob, c.qk_norm) == (
        1e6,
        1e-6,
        False,
        True,
        True,
    )
    assert all(c.layer_is_sparse(i) for i in range(48))
    total = sum(math.prod(s) for s in weight_shapes(c).values())
    assert abs(total / 1e9 - 30.5) < 0.05  # Qwen3-30B-A3B's model card: 30.5B parameters


class SliceRecorder(dict):
    """A weights dict that records which tensors were read whole and which as (dim, start, stop) slices."""

    def __init__(self, weights):
        super().__init__(weights)
        self.whole: set[str] = set()
        self.slices: dict[str, list[tuple[int, int, int]]] = {}

    def __getitem__(self, name):
        self.whole.add(name)
        return super().__getitem__(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(super().__getitem__(name).shape)

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        self.slices.setdefault(name, []).append((dim, start, stop))
        return super().__getitem__(name).narrow(dim, start, stop - start).clone()


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_reads_only_its_slices_of_the_stacked_experts(rank):
    full = dict(RandomWeights(TINY_A3B, torch.float32, "cpu", seed=3))
    reader = SliceRecorder(full)
    model = LlamaForCausalLM(TINY_A3B, torch.float32, "cpu", tp_rank=rank, tp_size=2)
    model.load_weights(reader)
    gate_up, down = "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"
    assert gate_up not in reader.whole and down not in reader.whole
    lo = rank * 16  # 32-wide experts over 2 ranks
    assert reader.slices[gate_up] == [(1, lo, lo + 16), (1, 32 + lo, 32 + lo + 16)]
    assert reader.slices[down] == [(2, lo, lo + 16)]
    moe_layer = model.layers[0].mlp
    assert torch.equal(moe_layer.w13[:, :16], full[gate_up][:, lo : lo + 16])
    assert torch.equal(moe_layer.w13[:, 16:], full[gate_up][:, 32 + lo : 32 + lo + 16])
    assert torch.equal(moe_layer.w2, full[down][:, :, lo : lo + 16])
    assert torch.equal(moe_layer.gate, full["model.layers.0.mlp.gate.weight"])  # the router is whole on every rank


def test_random_weight_moe_model_generates():
    """The benchmark's path, at a tiny scale: random weights drawn lazily, stacked experts, the engine's loop."""
    loaded = random_loaded_model(TINY_A3B, torch.float32, "cpu", seed=1, embed_std=0.5, name="random-a3b")
    engine = LLMEngine(EngineConfig(model="random-a3b", device="cpu", generation_config="vllm"), loaded=loaded)
    (out,) = engine_greedy(engine, [[5, 6, 7, 8]], 6)
    assert len(out) == 6
    logits = full_pass_logits(engine.runner, [5, 6, 7, 8] + out)
    assert logits[3:-1].argmax(-1).tolist() == out  # each token is the argmax of the logits before it
