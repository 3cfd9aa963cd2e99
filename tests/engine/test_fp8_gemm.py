"""FP8 linear layers on CPU (engine/models/fp8_gemm.py): weight quantization round-trips within e4m3's rounding,
the three scale layouts dequantize as their formats define them, fp8_linear on CPU is the float32 product of the
dequantized weight, and malformed scales are refused naming the expected shape. The kernels are gpu tests
(test_gpu_fp8_gemm.py)."""

from __future__ import annotations

import pytest
import torch

from kubellm.engine import loader as _loader_first  # noqa: F401 (loader before models: import cycle)
from kubellm.engine.models import fp8_gemm, fp8_quant

FP8 = torch.float8_e4m3fn
E4M3_HALF_STEP = 2.0**-4  # e4m3 has 3 mantissa bits: rounding moves a normal value by at most 2^-4 of itself


def random_weight(n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen) * 0.02


def test_per_tensor_quantization_maps_the_largest_magnitude_to_448_and_rounds_within_e4m3_steps() -> None:
    w = random_weight(48, 80, seed=1)
    w[3, 7] = -0.5  # the unique largest magnitude
    q, scale = fp8_gemm.quantize_weight_fp8(w)
    assert q.dtype == FP8 and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.dim() == 0
    assert scale.item() == pytest.approx(0.5 / 448, rel=1e-6)
    assert q[3, 7].float().item() == -448.0
    back = q.float() * scale
    normal = w.abs() > 2.0**-6 * scale  # above e4m3's smallest normal: relative rounding bound holds
    assert bool(((back - w).abs() <= E4M3_HALF_STEP * w.abs() + 1e-12)[normal].all())
    assert float((back - w).norm() / w.norm()) < 0.05  # ~3% RMS: e4m3 keeps 3 mantissa bits


def test_per_channel_quantization_gives_each_output_row_its_own_scale() -> None:
    w = random_weight(16, 64, seed=2)
    w[5] *= 100.0  # one row far larger: per-tensor would crush the others, per-channel must not
    q, scale = fp8_gemm.quantize_weight_fp8(w, per_channel=True)
    assert scale.shape == (16,)
    torch.testing.assert_close(scale, w.abs().amax(dim=1) / 448, rtol=1e-6, atol=0)
    assert bool((q.float().abs().amax(dim=1) == 448).all())
    back = q.float() * scale[:, None]
    for row in range(16):
        assert float((back[row] - w[row]).norm() / w[row].norm()) < 0.03, f"row {row}"


def test_an_all_zero_weight_quantizes_to_zeros_with_a_finite_scale() -> None:
    q, scale = fp8_gemm.quantize_weight_fp8(torch.zeros(8, 32))
    assert torch.isfinite(scale) and scale.item() > 0
    assert bool((q.float() == 0).all())


def test_block_scales_apply_to_their_bn_by_bk_tiles_including_ragged_edges() -> None:
    n, k, bn, bk = 20, 36, 8, 16  # 3 x 3 blocks, the last row and column of blocks partial
    gen = torch.Generator().manual_seed(3)
    q = (torch.randn(n, k, generator=gen) * 100).clamp(-448, 448).to(FP8)
    scales = torch.arange(1, 10, dtype=torch.float32).reshape(3, 3) / 64
    got = fp8_gemm.dequantize_weight_fp8(q, scales, (bn, bk))
    for i in range(n):
        for j in range(k):
            assert got[i, j].item() == q[i, j].float().item() * scales[i // bn, j // bk].item(), (i, j)


@pytest.mark.parametrize(
    ("kind", "block_size"), [("tensor", None), ("channel", None), ("channel-2d", None), ("block", (128, 128))]
)
def test_fp8_linear_on_cpu_is_the_float32_product_of_the_dequantized_weight(kind: str, block_size) -> None:
    n, k = 200, 300  # not multiples of 128: partial blocks
    gen = torch.Generator().manual_seed(4)
    q = (torch.randn(n, k, generator=gen) * 60).clamp(-448, 448).to(FP8)
    if kind == "tensor":
        scale = torch.tensor(0.003)
        w = q.float() * 0.003
    elif kind.startswith("channel"):
        scale = torch.rand(n, generator=gen) / 100 + 1e-3
        w = q.float() * scale[:, None]
        scale = scale[:, None] if kind == "channel-2d" else scale
    else:
        scale = torch.rand(2, 3, generator=gen) / 100 + 1e-3
        w = q.float() * scale.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    x = torch.randn(2, 5, k, generator=gen).to(torch.bfloat16)  # leading dims are kept
    got = fp8_gemm.fp8_linear(x, q, scale, block_size=block_size)
    assert got.shape == (2, 5, n) and got.dtype == torch.bfloat16
    expected = torch.einsum("abk,nk->abn", x.double(), w.double())
    torch.testing.assert_close(got.double(), expected, rtol=2**-8, atol=1e-3 * expected.abs().max().item())
    as_fp32 = fp8_gemm.fp8_linear(x, q, scale, block_size=block_size, out_dtype=torch.float32)
    assert as_fp32.dtype == torch.float32
    torch.testing.assert_close(as_fp32.double(), expected, rtol=1e-5, atol=1e-5)


def test_online_quantization_then_fp8_linear_approximates_the_bf16_layer() -> None:
    w = random_weight(64, 128, seed=5)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(6))
    q, scale = fp8_gemm.quantize_weight_fp8(w)
    got = fp8_gemm.fp8_linear(x, q, scale, out_dtype=torch.float32)
    exact = x @ w.t()
    assert float((got - exact).norm() / exact.norm()) < 0.05  # the weight's ~3% e4m3 rounding


def test_malformed_scales_and_weights_are_refused_naming_the_expected_shape() -> None:
    q = torch.zeros(256, 384, dtype=FP8)
    x = torch.zeros(2, 384, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"must be \(2, 3\), got \(2, 2\)"):
        fp8_gemm.fp8_linear(x, q, torch.ones(2, 2), block_size=(128, 128))
    with pytest.raises(ValueError, match=r"fits neither per-tensor .* nor per-channel \(\[256\]"):
        fp8_gemm.fp8_linear(x, q, torch.ones(3, 7))
    with pytest.raises(ValueError, match=r"weight must be torch\.float8_e4m3fn, got torch\.bfloat16"):
        fp8_gemm.fp8_linear(x, q.to(torch.bfloat16), torch.tensor(1.0))
    with pytest.raises(ValueError, match="x has 100 columns"):
        fp8_gemm.fp8_linear(torch.zeros(2, 100), q, torch.tensor(1.0))
    with pytest.raises(ValueError, match="must be 2-D"):
        fp8_gemm.quantize_weight_fp8(torch.zeros(4, 4, 4))


def test_activation_quantization_specs_follow_the_weight_format() -> None:
    static = torch.tensor(0.5)
    assert fp8_gemm.act_quant_for("block", (128, 128), None) == fp8_quant.ActQuant("group", group=128)
    assert fp8_gemm.act_quant_for("channel", None, None).mode == "token"
    assert fp8_gemm.act_quant_for("tensor", None, None).mode == "tensor"
    assert not fp8_gemm.act_quant_for("tensor", None, None).fusable  # dynamic per-tensor needs the whole tensor
    spec = fp8_gemm.act_quant_for("block", (128, 128), static)
    assert spec.mode == "tensor" and spec.static_scale is static and spec.fusable


def test_activation_quantization_off_gpu_says_what_it_needs(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.zeros(2, 128, dtype=torch.bfloat16)
    expected = (RuntimeError, "needs Triton") if fp8_quant.triton is None else (ValueError, "CUDA device")
    with pytest.raises(expected[0], match=expected[1]):
        fp8_quant.quantize(x, fp8_quant.ActQuant("token"))
    with pytest.raises(expected[0], match=expected[1]):
        fp8_quant.silu_mul_quant(x, fp8_quant.ActQuant("group"))


def test_silu_mul_then_fp8_linear_on_cpu_is_the_down_projection_of_the_activation() -> None:
    gen = torch.Generator().manual_seed(7)
    q, scale = fp8_gemm.quantize_weight_fp8(torch.randn(40, 96, generator=gen) * 0.05, per_channel=True)
    gate_up = torch.randn(5, 192, generator=gen)
    got = fp8_gemm.silu_mul_fp8_linear(gate_up, q, scale, out_dtype=torch.float32)
    act = torch.nn.functional.silu(gate_up[:, :96]) * gate_up[:, 96:]
    expected = act.double() @ (q.double() * scale.double()[:, None]).t()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
