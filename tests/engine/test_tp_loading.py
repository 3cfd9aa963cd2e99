"""How tensor-parallel ranks get their weights without any rank holding the whole model:

- random weights are drawn in independently seeded chunks, so a slice drawn alone equals the same slice of the
  full tensor, and a `RandomRecipe` (a few picklable numbers) rebuilds the very same weights in a worker;
- a lazily opened safetensors directory reads a slice straight from the file, equal to the eagerly loaded one;
- a rank loading its shard asks the mapping for slices only, never for a split tensor whole;
- an engine on a random-weight model with no files on disk runs at TP 2 and decodes greedily as at TP 1, with
  each rank holding half of the split weights (CPU, gloo).
"""

from __future__ import annotations

import pickle
import random

import pytest
import torch
from tp_parity import assert_tp2_decodes_as_tp1, cpu_tp_config

from kubellm.engine import random_model
from kubellm.engine.config import EngineConfig
from kubellm.engine.llm_engine import LLMEngine
from kubellm.engine.loader import load_model
from kubellm.engine.model_config import ModelConfig
from kubellm.engine.models.llama import LlamaForCausalLM
from kubellm.engine.random_model import RandomRecipe, RandomWeights, random_loaded_model

# Small, with a vocab that 2 ranks cannot split evenly (the last vocab shard carries a zero row).
TINY = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=301,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    eos_token_ids=[2],
)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 rows/columns, so every tiny weight spans several and shard edges fall inside chunks."""
    monkeypatch.setattr(random_model, "CHUNK", 7)


@pytest.mark.parametrize(
    ("name", "dim"),
    [
        ("model.embed_tokens.weight", 0),
        ("model.layers.0.self_attn.q_proj.weight", 0),
        ("model.layers.1.self_attn.o_proj.weight", 1),  # row-parallel: drawn in column chunks
        ("model.layers.1.mlp.down_proj.weight", 1),
        ("model.layers.0.mlp.gate_proj.weight", 1),  # not a split dimension: drawn whole, then cut
    ],
)
def test_a_random_slice_drawn_alone_equals_that_slice_of_the_full_tensor(small_chunks, name: str, dim: int):
    weights = RandomWeights(TINY, torch.float32, "cpu", seed=3)
    full = weights[name]
    assert full.std().item() == pytest.approx(0.02, rel=0.2)
    for start, stop in [(0, 1), (3, 12), (5, full.shape[dim]), (0, full.shape[dim])]:
        part = weights.read_slice(name, dim, start, stop)
        assert torch.equal(part, full.narrow(dim, start, stop - start)), (start, stop)
    assert torch.equal(RandomWeights(TINY, torch.float32, "cpu", seed=3)[name], full)  # deterministic
    assert not torch.equal(RandomWeights(TINY, torch.float32, "cpu", seed=4)[name], full)  # the seed matters


def test_a_recipe_rebuilds_the_same_weights_after_pickling():
    loaded = random_loaded_model(TINY, torch.float32, "cpu", seed=5, std=0.03, embed_std=0.5, name="tiny")
    recipe = pickle.loads(pickle.dumps(loaded.recipe))
    assert isinstance(recipe, RandomRecipe)
    again = recipe.load(torch.device("cpu"))
    assert again.name == "tiny" and again.config == TINY
    assert again.weights.keys() == loaded.weights.keys()
    for name in loaded.weights:
        assert torch.equal(again.weights[name], loaded.weights[name]), name
    with pytest.raises(ValueError, match="drawn on cpu"):
        recipe.load(torch.device("meta"))


def test_lazy_safetensors_slices_equal_the_eager_weights(tiny_model_dir):
    path = tiny_model_dir("qwen3")
    eager = load_model(path).weights
    lazy = load_model(path, lazy=True).weights
    assert set(lazy.keys()) == set(eager.keys())
    name = "model.layers.0.mlp.down_proj.weight"
    assert lazy.shape(name) == tuple(eager[name].shape)
    assert torch.equal(lazy[name], eager[name]) and lazy[name].dtype == torch.float32
    assert torch.equal(lazy.read_slice(name, 1, 8, 24), eager[name][:, 8:24])
    assert torch.equal(lazy.read_slice(name, 0, 3, 5), eager[name][3:5])
    assert load_model(path, "bfloat16", lazy=True).weights[name].dtype == torch.bfloat16


class Recorder(dict):
    """A plain weights dict that records how each tensor was read: whole, or as (dim, start, stop) slices."""

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
def test_a_rank_reads_only_its_slices_of_the_split_weights(rank: int):
    full = dict(RandomWeights(TINY, torch.float32, "cpu", seed=1))
    reader = Recorder(full)
    model = LlamaForCausalLM(TINY, torch.float32, "cpu", tp_rank=rank, tp_size=2)
    model.load_weights(reader)
    split = {n for n in full if not n.endswith("norm.weight")}
    assert reader.whole.isdisjoint(split), sorted(reader.whole & split)
    assert set(reader.slices) == split
    q = reader.slices["model.layers.0.self_attn.q_proj.weight"]
    assert q == [(0, rank * 32, (rank + 1) * 32)]  # 4 heads x 16 over 2 ranks
    assert reader.slices["model.layers.0.mlp.down_proj.weight"] == [(1, rank * 48, (rank + 1) * 48)]
    assert reader.slices["model.embed_tokens.weight"] == [(0, rank * 151, min(301, (rank + 1) * 151))]
    # what was read is that rank's part of the full model: its rows of q, and the zero padding row past the vocab
    q_rows = full["model.layers.0.self_attn.q_proj.weight"][rank * 32 : rank * 32 + 32]
    assert torch.equal(model.layers[0].self_attn.qkv_proj.weight[:32], q_rows)
    if rank == 1:
        assert torch.equal(model.embed_tokens[-1], torch.zeros(64))


def test_tp_graph_fallback_flag_defaults_from_its_environment_variable(monkeypatch):
    monkeypatch.delenv("KUBELLM_TP_CUDA_GRAPHS", raising=False)
    assert EngineConfig().tp_cuda_graphs
    monkeypatch.setenv("KUBELLM_TP_CUDA_GRAPHS", "0")
    assert not EngineConfig().tp_cuda_graphs
    assert EngineConfig(tp_cuda_graphs=True).tp_cuda_graphs, "an explicit value wins over the variable"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_random_recipe_model_at_tp2_decodes_as_at_tp1():
    """No path on disk: the worker process draws its own shards from the recipe."""
    loaded = random_loaded_model(TINY, torch.float32, "cpu", seed=2, embed_std=0.5, name="random-tiny")
    assert loaded.path == "" and loaded.recipe is not None
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 301) for _ in range(n)] for n in (2, 9, 30)]

    parity = assert_tp2_decodes_as_tp1(
        lambda tp: LLMEngine(cpu_tp_config("random-tiny", tp, generation_config="vllm"), loaded=loaded),
        prompts, 8, "random recipe",
    )  # fmt: skip
    full, counts = parity.full_counts, parity.rank_counts
    padded_vocab_rows = 2 * 151 - 301  # one zero row in the last vocab shard, for the embedding and the LM head
    for rank_counts in counts:
        assert 2 * rank_counts["sharded"] == full["sharded"] + 2 * padded_vocab_rows * 64, (rank_counts, full)
        assert rank_counts["replicated"] == full["replicated"]
