"""bench/fp8_checkpoint.py: random weights seen as an fp8 128x128-block checkpoint, read by the engine's loader
view as a real checkpoint would be."""

from __future__ import annotations

import torch

from bench.fp8_checkpoint import BLOCK_SCHEME, BlockFp8Checkpoint, quantize_blocks
from kubellm.engine.loader.fp8_weights import Fp8Weights


def test_block_quantization_round_trips_within_e4m3_precision():
    w = torch.randn(300, 200) * torch.linspace(0.01, 3, 200)  # column ranges spanning blocks of different scales
    q, scale = quantize_blocks(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (300, 200) and scale.shape == (3, 2)
    full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :200]
    back = q.float() * full
    assert float(((back - w).abs() / (w.abs() + full * 2**-6)).max()) <= 2**-4  # half an e4m3 step, or subnormal
    assert float(scale[0, 0]) == float(w[:128, :128].abs().max() / 448)


def test_loader_view_reads_the_block_checkpoint():
    weights = {"model.layers.0.self_attn.q_proj.weight": torch.randn(256, 192), "model.norm.weight": torch.ones(192)}
    ckpt = BlockFp8Checkpoint(weights)
    assert set(ckpt) == {*weights, "model.layers.0.self_attn.q_proj.weight_scale_inv"}
    assert ckpt.shape("model.layers.0.self_attn.q_proj.weight_scale_inv") == (2, 2)
    view = Fp8Weights(ckpt, BLOCK_SCHEME, torch.float32)
    assert set(view) == set(weights)  # scales are not weights
    assert view.is_fp8("model.layers.0.self_attn.q_proj.weight") and not view.is_fp8("model.norm.weight")
    w = weights["model.layers.0.self_attn.q_proj.weight"]
    assert float((view["model.layers.0.self_attn.q_proj.weight"] - w).abs().max()) < 0.07 * float(w.abs().max())
    t = view.fp8("model.layers.0.self_attn.q_proj.weight")
    assert t.block_size == (128, 128) and t.scale.shape == (2, 2)
