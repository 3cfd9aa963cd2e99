"""The FP8 activation scale as the GPU tests' torch references compute it: amax / 448 divided once, IEEE rounded.

Why not `amax / 448`: on CUDA, torch divides a tensor by a Python number as a multiplication by the number's rounded
reciprocal (aten's div_true_kernel_cuda: "may lose one bit of precision"), which is one ulp off IEEE division for about
half of all amax values; on CPU it divides. The kernels divide with div.rn (fp8_quant.dynamic_scale), so a reference
built on `amax / 448` disagrees with them in the last bit on a GPU only. The ulp is harmless in itself, but it decides
exact ties: where x / scale would land exactly halfway between two e4m3 values (bf16 inputs do, for some amax), the
off-by-one-ulp scale rounds the tie the other way, one e4m3 step (up to 1/8 of the value). With 128-column groups
that hits a group in ~1.5% of groups, and a flipped input to gate_up moves the whole row's activation, which the
down GEMM's own FP8 quantization amplifies: the block-scaled MoE's 'exact' reference drifted 1.6-2.7e-2 on an H100."""

from __future__ import annotations

import torch

FP8_MAX = 448.0
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # fp8_quant's floor, written here independently


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """max(amax / 448, 1 / (448 * 512)) with amax / 448 an IEEE division on any device (a tensor divisor, not a
    Python number: aten then divides element by element)."""
    return (amax.float() / torch.full_like(amax, FP8_MAX, dtype=torch.float32)).clamp_min(MIN_SCALE)
