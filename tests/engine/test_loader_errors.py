"""Bad paths, missing or corrupt files, and unsupported models fail with clear errors naming the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from kubellm.engine.config import EngineConfig
from kubellm.engine.loader import ModelLoadError, UnsupportedModelError, load_model
from kubellm.engine.model_config import ModelConfig
from kubellm.engine.model_runner import ModelRunner


@pytest.fixture
def llama_copy(tmp_path, tiny_model_dir) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), dst)
    return dst


def test_unknown_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="does not exist") as e:
        load_model(missing)
    assert str(missing) in str(e.value) and "smollm2-135m-instruct" in str(e.value)
    with pytest.raises(ModelLoadError, match="unknown builtin model"):
        load_model("builtin:no-such-model")


def test_directory_without_model(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no config\.json") as e:
        load_model(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_missing_weights(llama_copy):
    (llama_copy / "model.safetensors").unlink()
    (llama_copy / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"no model\.safetensors.*only safetensors"):
        load_model(llama_copy)


def test_missing_tokenizer(llama_copy):
    (llama_copy / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"no tokenizer\.json"):
        load_model(llama_copy)


def test_bad_config_json(llama_copy):
    (llama_copy / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"cannot read .*config\.json"):
        load_model(llama_copy)


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(llama_copy, damage, lazy):
    file = llama_copy / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(b"\x07" * 64 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="corrupt or unreadable weights file") as e:
        load_model(llama_copy, lazy=lazy)
    assert str(file) in str(e.value)


def test_missing_shard(llama_copy):
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (llama_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"lacks shard.*model-00001-of-00002"):
        load_model(llama_copy)


def test_weights_that_do_not_fit_the_config(llama_copy):
    weights = load_file(llama_copy / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, llama_copy / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"lacks weight 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        ModelRunner(load_model(llama_copy), EngineConfig(device="cpu"))
    cfg = json.loads((llama_copy / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (llama_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="has shape"):
        ModelRunner(load_model(llama_copy), EngineConfig(device="cpu"))


@pytest.mark.parametrize(
    "arch", ["Qwen3NextForCausalLM", "KimiK25ForConditionalGeneration", "KimiK2ForCausalLM", "GPT2LMHeadModel"]
)
def test_unsupported_architecture(llama_copy, arch):
    cfg = json.loads((llama_copy / "config.json").read_text())
    cfg["architectures"] = [arch]
    (llama_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError) as e:
        load_model(llama_copy)
    assert arch in str(e.value) and "LlamaForCausalLM" in str(e.value) and "Qwen3ForCausalLM" in str(e.value)


def test_unsupported_features():
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=10, hidden_size=8, intermediate_size=8)
    base |= dict(num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(UnsupportedModelError, match="mixture of experts"):
        ModelConfig.from_hf_config(base | {"num_experts": 8})
    with pytest.raises(UnsupportedModelError, match="rope scaling type 'yarn'"):
        ModelConfig.from_hf_config(base | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(UnsupportedModelError, match="activation 'gelu'"):
        ModelConfig.from_hf_config(base | {"hidden_act": "gelu"})


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(ModelLoadError, match="not a GGUF file") as e:
        load_model(bad)
    assert str(bad) in str(e.value)


@pytest.mark.parametrize("keep_bytes", [2_000, 50_000_000])
def test_truncated_gguf(tmp_path, embedded_model_path, keep_bytes):
    """Cut inside the metadata, and cut inside the tensor data."""
    cut = tmp_path / "cut.gguf"
    with open(embedded_model_path, "rb") as src:
        cut.write_bytes(src.read(keep_bytes))
    with pytest.raises(ModelLoadError, match="truncated") as e:
        load_model(cut)
    assert str(cut) in str(e.value)


def test_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "moe.gguf"
    writer = gguf.GGUFWriter(str(path), "deepseek2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="unsupported GGUF architecture 'deepseek2'") as e:
        load_model(path)
    assert "llama" in str(e.value)
