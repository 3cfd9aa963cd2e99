"""The fused MoE module on CPU-only installs: it imports, a call says clearly why it cannot run, tile configs are
found per GPU and shape (nearest batch bucket, default for unseen shapes), and every committed config file parses
into tiles the kernels accept."""

from __future__ import annotations

import json

import pytest
import torch

from kubellm.engine import loader as _loader_first  # noqa: F401 (loader before models: import cycle)
from kubellm.engine.models import fused_moe


def test_calling_on_cpu_names_the_missing_piece(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.zeros(2, 8, dtype=torch.bfloat16)
    w13, w2 = torch.zeros(4, 6, 8, dtype=torch.bfloat16), torch.zeros(4, 8, 3, dtype=torch.bfloat16)
    ids = torch.zeros(2, 1, dtype=torch.int32)
    expected = (RuntimeError, "need Triton") if fused_moe.triton is None else (ValueError, "CUDA device")
    with pytest.raises(expected[0], match=expected[1]):
        fused_moe.fused_experts(x, w13, w2, torch.ones(2, 1), ids)
    with pytest.raises(expected[0], match=expected[1]):
        fused_moe.fused_topk(torch.zeros(2, 4), 1, True)


def test_tuned_file_gives_the_nearest_bucket_and_unseen_shapes_the_default(tmp_path, monkeypatch) -> None:
    small = {"BLOCK_M": 16, "up": dict(BLOCK_N=32, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=5),
             "down": dict(BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=3)}  # fmt: skip
    big = {"BLOCK_M": 64, "up": dict(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
           "down": dict(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)}  # fmt: skip
    name = fused_moe.config_file_name(128, 768, 2048, torch.bfloat16, "NVIDIA H100 80GB HBM3")
    assert name == "E=128,N=768,H=2048,device=NVIDIA_H100_80GB_HBM3,dtype=bfloat16.json"
    (tmp_path / name).write_text(json.dumps({"configs": {"1": small, "1024": big}}))
    monkeypatch.setattr(fused_moe, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(fused_moe, "current_device_name", lambda: "NVIDIA H100 80GB HBM3")
    fused_moe.load_configs.cache_clear()
    try:
        assert fused_moe.get_config(128, 768, 2048, torch.bfloat16, 3, 8).block_m == 16
        assert fused_moe.get_config(128, 768, 2048, torch.bfloat16, 900, 8) == fused_moe.MoeConfig.from_json(big)
        unseen = fused_moe.get_config(128, 384, 2048, torch.bfloat16, 900, 8)
        assert unseen == fused_moe.default_config(900, 128, 8)
        assert fused_moe.config_source(128, 384, 2048, torch.bfloat16).startswith("default tiles")
        assert fused_moe.config_source(128, 768, 2048, torch.bfloat16).startswith("tuned")
    finally:
        fused_moe.load_configs.cache_clear()


def test_default_tiles_grow_with_rows_per_expert() -> None:
    heights = [fused_moe.default_config(t, 128, 8).block_m for t in (1, 64, 256, 4096)]
    assert heights == sorted(heights) and heights[0] == 16 and heights[-1] == 64


def test_committed_config_files_parse_into_valid_tiles() -> None:
    files = sorted(fused_moe.CONFIG_DIR.glob("*.json"))
    for path in files:
        doc = json.loads(path.read_text())
        assert path.name == fused_moe.config_file_name(
            doc["E"], doc["N"], doc["H"], getattr(torch, doc["dtype"]), doc["device"]
        )
        for bucket, cfg in doc["configs"].items():
            c = fused_moe.MoeConfig.from_json(cfg)
            assert int(bucket) >= 1 and c.block_m in (16, 32, 64, 128), f"{path.name} bucket {bucket}"
            for g in (c.up, c.down):
                assert g.BLOCK_N >= 16 and g.BLOCK_K >= 16 and g.num_warps in (2, 4, 8) and g.num_stages >= 1
