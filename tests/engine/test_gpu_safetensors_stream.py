"""On a GPU, a lazily read safetensors checkpoint streams whole tensors to the device through pinned staging
buffers (SafetensorsWeights.streaming_to), giving exactly the tensors the safetensors library reads on the host;
slices (tensor-parallel shards) are still read on the host."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from kubellm.engine.loader import safetensors_file as sf
from kubellm.engine.loader.hf_dir import SafetensorsWeights

pytestmark = pytest.mark.gpu


def test_streamed_tensors_land_on_the_gpu_equal_to_the_library(tmp_path, monkeypatch):
    monkeypatch.setattr(sf, "STAGING_BYTES", 1000)  # many chunks per tensor, both buffers in turn
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": torch.randn(300, 64, generator=g).bfloat16(),
        "model.norm.weight": torch.randn(64, generator=g).bfloat16(),
        "model.layers.0.mlp.down_proj.weight": torch.randn(64, 129, generator=g).bfloat16(),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ref = load_file(str(tmp_path / "model.safetensors"))
    weights = SafetensorsWeights(tmp_path, torch.bfloat16).streaming_to(torch.device("cuda"))
    assert weights._staging is not None and all(b.is_pinned() for b in weights._staging.buffers)
    for name, want in ref.items():
        got = weights[name]
        assert got.device.type == "cuda" and torch.equal(got.cpu(), want), name
    shard = weights.read_slice("model.layers.0.mlp.down_proj.weight", 1, 10, 70)
    assert shard.device.type == "cpu" and torch.equal(shard, ref["model.layers.0.mlp.down_proj.weight"][:, 10:70])


@pytest.mark.parametrize("kind", ["llama3", "qwen3-moe"])
def test_a_model_loaded_on_the_gpu_from_files_holds_the_checkpoint_exactly(tiny_model_dir, kind):
    """The model runner streams (no quantization, CUDA): every parameter equals the same model loaded on the CPU.
    In float32, so both hold the float32 checkpoint's values unrounded; flashinfer runs only in bf16/fp16, hence the
    torch attention backend on CUDA (the attention backend plays no part in loading)."""
    from kubellm.engine.config import EngineConfig
    from kubellm.engine.loader import load_model
    from kubellm.engine.model_runner import ModelRunner

    path = tiny_model_dir(kind)
    runners = {
        dev: ModelRunner(
            load_model(path, dtype="float32", lazy=True),
            EngineConfig(model=str(path), device=dev, dtype="float32", enforce_eager=True, attention_backend="torch"),
        )
        for dev in ("cpu", "cuda")
    }
    cpu, gpu = (dict(runners[d].model.named_parameters()) for d in ("cpu", "cuda"))
    assert set(cpu) == set(gpu)
    for name, p in gpu.items():
        assert p.device.type == "cuda" and torch.equal(p.detach().cpu(), cpu[name].detach()), name
    assert runners["cuda"].weights_load_seconds > 0
