"""Acceptance of the [quant-fp8] issue's loading part on CPU: tiny random Llama and Qwen3-MoE checkpoints written
in each FP8 format (fp8 per-tensor / 32x32-block / static activations, compressed-tensors per-tensor / per-channel /
static) give the teacher-forced logits of transformers holding the dequantized weights; `--quantization fp8` gives
those of transformers holding weights rounded through FP8 per fused layer; unknown formats are refused naming
the method or variant."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from fp8_checkpoints import FORMATS, online_fp8_reference, write_fp8_checkpoint
from tiny_models import full_pass_logits, hf_logits, make_runner

from kubellm.engine.config import EngineConfig
from kubellm.engine.loader import load_model
from kubellm.engine.loader.quantization import UnsupportedQuantizationError
from kubellm.engine.model_config import UnsupportedModelError
from kubellm.engine.model_runner import ModelRunner

KINDS = ("llama", "qwen3-moe")
FP8 = torch.float8_e4m3fn
IDS = [(7 * i + 11) % 300 + 4 for i in range(40)]  # 40 distinct ids


def rel_l2(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def fp8_dirs(tiny_model_dir, tmp_path_factory):
    """(kind, fmt) -> (FP8 checkpoint dir, dequantized reference dir)."""
    made = {}

    def get(kind: str, fmt: str):
        if (kind, fmt) not in made:
            root = tmp_path_factory.mktemp(f"{kind}-{fmt}")
            dst, ref = root / "fp8", root / "reference"
            write_fp8_checkpoint(tiny_model_dir(kind), dst, fmt, ref, kv_scales=fmt == "fp8-tensor")
            made[kind, fmt] = dst, ref
        return made[kind, fmt]

    return get


def reference_logits(path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return hf_logits(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), IDS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_fp8_checkpoint_logits_equal_dequantized_transformers(kind, fmt, fp8_dirs, tiny_model_dir):
    dst, ref = fp8_dirs(kind, fmt)
    loaded = load_model(dst)
    assert loaded.quantization is not None
    ours = full_pass_logits(make_runner(loaded, num_blocks=8), IDS)
    expected = reference_logits(ref)
    assert rel_l2(ours, expected) < 1e-4
    # the quantization is visible: the unquantized original is far from the reference
    assert rel_l2(reference_logits(tiny_model_dir(kind)), expected) > 1e-2


def test_deepseek_v3_in_its_own_fp8_block_format_on_cpu(fp8_dirs):
    """DeepSeek-V3 ships as fp8 with block weight_scale_inv on every projection, MLA's and the experts'."""
    dst, ref = fp8_dirs("deepseek-v3", "fp8-block")
    assert load_model(dst).weights.is_fp8("model.layers.1.self_attn.kv_a_proj_with_mqa.weight")
    ours = full_pass_logits(make_runner(load_model(dst), num_blocks=8), IDS)
    assert rel_l2(ours, reference_logits(ref)) < 1e-4


def test_ignored_layers_stay_unquantized_and_scales_are_not_weights(fp8_dirs):
    dst, _ = fp8_dirs("llama", "fp8-tensor")
    loaded = load_model(dst)
    assert loaded.weights.is_fp8("model.layers.1.mlp.down_proj.weight")
    assert not loaded.weights.is_fp8("model.layers.0.mlp.down_proj.weight")  # listed in modules_to_not_convert
    assert "model.layers.1.mlp.down_proj.weight_scale" not in loaded.weights
    assert all(not name.endswith("_scale") for name in loaded.weights)


def test_checkpoint_kv_scales_feed_the_fp8_kv_cache(fp8_dirs):
    dst, _ = fp8_dirs("llama", "fp8-tensor")  # written with k_scale = v_scale = 0.05 + 0.01 * layer
    loaded = load_model(dst)
    assert loaded.kv_cache_fp8
    runner = ModelRunner(loaded, EngineConfig(device="cpu", kv_cache_dtype="fp8"))
    assert runner.attn.k_scales == pytest.approx([0.05, 0.06])
    assert runner.attn.v_scales == pytest.approx([0.05, 0.06])
    runner.allocate_kv_cache(8)
    assert runner.kv_caches[0].dtype == torch.float8_e4m3fn


def test_lazy_loading_reads_fp8_checkpoints_too(fp8_dirs):
    dst, ref = fp8_dirs("qwen3-moe", "fp8-block")
    ours = full_pass_logits(make_runner(load_model(dst, lazy=True), num_blocks=8), IDS)
    assert rel_l2(ours, reference_logits(ref)) < 1e-4


@pytest.mark.parametrize("kind", [*KINDS, "deepseek-v3"])
def test_online_fp8_rounds_each_fused_layer_per_tensor(kind, tiny_model_dir, tmp_path):
    ref = online_fp8_reference(tiny_model_dir(kind), tmp_path / "reference")
    runner = ModelRunner(load_model(tiny_model_dir(kind)), EngineConfig(device="cpu", quantization="fp8"))
    runner.allocate_kv_cache(8)
    assert runner.quantization is not None and runner.quantization.method == "online"
    expected = reference_logits(ref)
    assert rel_l2(full_pass_logits(runner, IDS), expected) < 1e-4
    assert rel_l2(reference_logits(tiny_model_dir(kind)), expected) > 1e-3


def _with_quantization_config(src, dst, config) -> None:
    shutil.copytree(src, dst)
    data = json.loads((dst / "config.json").read_text())
    data["quantization_config"] = config
    (dst / "config.json").write_text(json.dumps(data))


_CT_INT8 = {
    "quant_method": "compressed-tensors",
    "format": "int-quantized",
    "config_groups": {
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel"}}
    },
}
_CT_W4A16 = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "config_groups": {"group_0": {"weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}}},
}
_CT_FP8_WEIGHT_ONLY = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True}}},
}


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"quant_method": "gptq", "bits": 4}, "'gptq'"),
        ({"quant_method": "awq", "bits": 4}, "'awq'"),
        ({"quant_method": "fp8", "fmt": "e5m2"}, "'e5m2'"),
        ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size"),
        (_CT_INT8, "'int-quantized'"),
        (_CT_W4A16, "'pack-quantized'"),
        (_CT_FP8_WEIGHT_ONLY, "weight-only FP8"),
    ],
)
def test_unsupported_quantization_is_refused_naming_it(config, named, tiny_model_dir, tmp_path):
    dst = tmp_path / "model"
    _with_quantization_config(tiny_model_dir("llama"), dst, config)
    with pytest.raises(UnsupportedModelError) as err:
        load_model(dst)
    assert named in str(err.value)
    assert "quantization_config" in str(err.value)
    assert "does not use" not in str(err.value)


def test_online_quantization_contradicting_the_checkpoint_is_refused(fp8_dirs):
    dst, _ = fp8_dirs("llama", "ct-channel")
    with pytest.raises(UnsupportedQuantizationError, match="contradicts the checkpoint's own compressed-tensors"):
        ModelRunner(load_model(dst), EngineConfig(device="cpu", quantization="fp8"))


def test_missing_scale_is_a_load_error_naming_the_weight(fp8_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    from kubellm.engine.loader.errors import ModelLoadError

    src, _ = fp8_dirs("llama", "fp8-tensor")
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    del tensors["model.layers.1.self_attn.o_proj.weight_scale"]
    save_file(tensors, str(dst / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight.*has no weight_scale"):
        make_runner(load_model(dst))


@pytest.mark.parametrize("kind", KINDS)
def test_deferred_weights_take_storage_only_when_loaded(kind, fp8_dirs):
    """What the runner does on CUDA for FP8 models (so no bf16 copy of the weights is ever allocated there), run
    here on CPU: linear and expert weights are one-element placeholders until loading gives them storage, in place
    (experts) or replaced; the loaded model computes what an ordinary one does."""
    from kubellm.engine.models import build_model
    from kubellm.engine.models.causal_lm import deferred_weights, is_deferred

    loaded = load_model(fp8_dirs(kind, "ct-channel")[0])
    with deferred_weights():
        model = build_model(loaded.config, torch.float32, "cpu")
    placeholders = [p for p in model.parameters() if is_deferred(p)]
    assert len(placeholders) >= 2 * loaded.config.num_hidden_layers
    assert all(p.untyped_storage().nbytes() == 4 for p in placeholders)
    model.load_weights(loaded.weights)
    assert not any(is_deferred(p) for p in model.parameters())
    runner = make_runner(loaded, num_blocks=8)
    expected = full_pass_logits(runner, IDS)
    runner.model = model.eval()
    assert torch.equal(full_pass_logits(runner, IDS), expected)


@pytest.mark.parametrize("fmt", ["fp8-tensor", "fp8-block", "ct-channel", "ct-static"])
def test_fp8_expert_stacks_hold_the_checkpoint_numbers_in_fused_moe_layout(fmt, fp8_dirs):
    """What the CUDA path hands the fused MoE kernel: stacked FP8 experts whose scales pass its Fp8Experts check
    and dequantize, row by row, to the checkpoint's dequantized experts."""
    from kubellm.engine.loader.quantization import dequantize
    from kubellm.engine.models.fused_moe import Fp8Experts
    from kubellm.engine.models.moe import fp8_expert_stacks

    loaded = load_model(fp8_dirs("qwen3-moe", fmt)[0])
    c, prefix = loaded.config, "model.layers.2.mlp.experts"  # layer 2: sparse and quantized
    names = [[f"{prefix}.{i}.{p}_proj.weight" for p in ("gate", "up", "down")] for i in range(c.num_experts)]
    stacks = fp8_expert_stacks(loaded.weights, names)
    assert stacks is not None
    w13, w2 = stacks
    e, inter, h = c.num_experts, c.moe_intermediate_size, c.hidden_size
    assert w13.weight.shape == (e, 2 * inter, h) and w2.weight.shape == (e, h, inter) and w13.weight.dtype == FP8
    Fp8Experts(w13.scale, w2.scale, w13.block_size, w13.input_scale, w2.input_scale).check(e, h, inter)
    assert (w13.input_scale is not None) == (fmt == "ct-static")
    for i in (0, e - 1):
        gate, up, down = (loaded.weights[n] for n in names[i])
        scale13 = w13.scale[i] if w13.block_size else w13.scale[i].reshape(-1, 1)
        assert torch.equal(dequantize(w13.weight[i], scale13, w13.block_size), torch.cat([gate, up]))
        scale2 = w2.scale[i] if w2.block_size else w2.scale[i].reshape(-1, 1)
        assert torch.equal(dequantize(w2.weight[i], scale2, w2.block_size), down)


def test_fp8_checkpoint_at_tp2_decodes_as_at_tp1_on_cpu(fp8_dirs):
    """Each rank reads its shard of the dequantized weights (block scales do not split at every shard edge, so
    FP8 tensors are dequantized whole, then cut); greedy decoding equals TP 1's."""
    from tp_parity import assert_tp2_decodes_as_tp1, cpu_tp_config

    from kubellm.engine.llm_engine import LLMEngine

    dst, _ = fp8_dirs("qwen3-moe", "fp8-block")
    prompts = [[(5 * i + 7 * n) % 300 + 4 for i in range(n)] for n in (5, 19)]
    parity = assert_tp2_decodes_as_tp1(lambda tp: LLMEngine(cpu_tp_config(str(dst), tp)), prompts, 6, "fp8-block")
    for counts in parity.rank_counts:
        assert counts["sharded"] * 2 == parity.full_counts["sharded"]


@pytest.mark.parametrize(
    ("kind", "fmt"), [("llama", "ct-channel"), ("llama", "fp8-tensor"), ("qwen3-moe", "fp8-block")]
)
def test_tensor_parallel_ranks_hold_fp8_shards_that_dequantize_to_their_slices(kind, fmt, tiny_model_dir, tmp_path,
                                                                                monkeypatch):  # fmt: skip
    """The CUDA branch of loading (FP8 kept, sharded per rank) run on CPU by letting the reader keep FP8 here: each
    rank's FP8 layers and experts, dequantized, equal that rank's slice of the dequantized checkpoint. 16x16
    blocks, so most shard edges fall on block edges; Qwen3-MoE's k/v shards (24 rows) do not, and load
    dequantized."""
    from kubellm.engine.loader.quantization import dequantize
    from kubellm.engine.models import build_model
    from kubellm.engine.models.causal_lm import CheckpointReader
    from kubellm.engine.models.moe import fp8_expert_stacks

    write_fp8_checkpoint(tiny_model_dir(kind), tmp_path / "fp8", fmt, tmp_path / "ref", block=(16, 16))
    loaded = load_model(tmp_path / "fp8")
    keeps = CheckpointReader.keeps_fp8
    held = 0
    for rank in (0, 1):
        ref = build_model(loaded.config, torch.float32, "cpu", rank, 2)
        ref.load_weights(loaded.weights)
        monkeypatch.setattr(CheckpointReader, "keeps_fp8", lambda self, n, d: keeps(self, n, torch.device("cuda")))
        ours = build_model(loaded.config, torch.float32, "cpu", rank, 2)
        ours.load_weights(loaded.weights)
        monkeypatch.setattr(CheckpointReader, "keeps_fp8", keeps)
        expected = dict(ref.named_modules())
        for name, module in ours.named_modules():
            p = getattr(module, "fp8", None)
            if p is None:
                continue
            held += 1
            scale = p.scale if p.block_size or p.scale.numel() == 1 else p.scale.reshape(-1, 1)
            assert torch.equal(dequantize(module.weight, scale, p.block_size), expected[name].weight), name
        c = loaded.config
        names = [[f"model.layers.2.mlp.experts.{i}.{p}_proj.weight" for p in ("gate", "up", "down")]
                 for i in range(c.num_experts)] if c.num_experts else []  # fmt: skip
        if names:
            w13, w2 = fp8_expert_stacks(loaded.weights, names, rank, 2)
            moe = ref.layers[2].mlp
            for i in range(c.num_experts):
                assert torch.equal(dequantize(w13.weight[i], w13.scale[i], w13.block_size), moe.w13[i])
                assert torch.equal(dequantize(w2.weight[i], w2.scale[i], w2.block_size), moe.w2[i])
    assert held >= 2 * loaded.config.num_hidden_layers


def test_deepseek_keeps_its_mla_projections_fp8_where_the_gpu_path_would(fp8_dirs, monkeypatch):
    """The CUDA branch of DeepSeek's loading run on CPU (the reader allowed to keep FP8 here; fp8_linear computes
    with the dequantized weight on CPU): q/kv_a/o projections hold FP8, kv_b_proj (absorbed into the attention)
    loads dequantized, and the logits equal the ordinary CPU load's."""
    from kubellm.engine.models.causal_lm import CheckpointReader

    dst, _ = fp8_dirs("deepseek-v3", "fp8-block")
    loaded = load_model(dst)
    runner = make_runner(loaded, num_blocks=8)
    expected = full_pass_logits(runner, IDS)
    keeps = CheckpointReader.keeps_fp8
    monkeypatch.setattr(CheckpointReader, "keeps_fp8", lambda self, n, d: keeps(self, n, torch.device("cuda")))
    fp8_runner = make_runner(load_model(dst), num_blocks=8)
    attn = fp8_runner.model.layers[1].self_attn
    for name in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"):
        assert getattr(attn, name).weight.dtype == FP8, name
    assert attn.kv_b_proj.weight.dtype == torch.float32
    assert rel_l2(full_pass_logits(fp8_runner, IDS), expected) < 1e-5


@pytest.mark.parametrize("lazy", [False, True])
def test_fp8_tensors_without_a_quantization_config_are_refused(fp8_dirs, tmp_path, lazy):
    from kubellm.engine.loader.errors import ModelLoadError

    src, _ = fp8_dirs("llama", "fp8-tensor")
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    del config["quantization_config"]
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"is float8_e4m3fn but config.json has no quantization_config") as err:
        load_model(dst, lazy=lazy)
    assert "corrupt" not in str(err.value)
