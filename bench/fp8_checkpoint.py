"""Random weights in the `fp8` block checkpoint layout (DeepSeek-V3 / Qwen3-FP8: float8_e4m3fn weights with 128x128
`weight_scale_inv`), for timing FP8 block GEMMs without a real checkpoint: each linear weight is drawn in bf16 as
RandomWeights draws it, then quantized per block on the device. vLLM gets the same format through a config.json
whose quantization_config says so (its dummy loader fills the FP8 tensors itself).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F

from kubellm.engine.loader.quantization import FP8_DTYPE, FP8_MAX, Fp8Scheme

BLOCK = (128, 128)
BLOCK_QUANTIZATION_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)}
BLOCK_SCHEME = Fp8Scheme("fp8", "block", "dynamic", BLOCK)
# Per-projection linear weights (dense layers and per-expert names); stacked experts stay bf16 here.
_LINEAR = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")


def quantize_blocks(w: torch.Tensor, block: tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (FP8 weight [N, K], float32 scales [ceil(N/bn), ceil(K/bk)]) with w ~= fp8 * scale per block."""
    bn, bk = block
    n, k = w.shape
    rn, rk = -(-n // bn), -(-k // bk)
    blocks = F.pad(w.float(), (0, rk * bk - k, 0, rn * bn - n)).view(rn, bn, rk, bk)
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / FP8_MAX
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(rn * bn, rk * bk)[:n, :k].contiguous(), scale


class BlockFp8Checkpoint(Mapping[str, torch.Tensor]):
    """`weights` (bf16, e.g. RandomWeights) seen as an fp8 block checkpoint: linear weights FP8 plus their
    `weight_scale_inv`, everything else as it is. Wrap it in loader.fp8_weights.Fp8Weights with BLOCK_SCHEME."""

    def __init__(self, weights: Mapping[str, torch.Tensor]):
        self.weights = weights
        self._scales = {f"{n.removesuffix('.weight')}.weight_scale_inv": n for n in weights if _LINEAR.search(n)}
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _quantized(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self._cache:  # one entry at a time: the loader reads a weight, then its scale
            self._cache = {name: quantize_blocks(self.weights[name])}
        return self._cache[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._scales:
            return self._quantized(self._scales[name])[1]
        if _LINEAR.search(name):
            return self._quantized(name)[0]
        return self.weights[name]

    def __contains__(self, name: object) -> bool:
        return name in self._scales or name in self.weights

    def __iter__(self) -> Iterator[str]:
        yield from self.weights
        yield from self._scales

    def __len__(self) -> int:
        return len(self.weights) + len(self._scales)

    def dtype_of(self, name: str) -> torch.dtype:
        if name in self._scales:
            return torch.float32
        return FP8_DTYPE if _LINEAR.search(name) else torch.bfloat16

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._scales:
            n, k = self.shape(self._scales[name])
            return (-(-n // BLOCK[0]), -(-k // BLOCK[1]))
        shape = getattr(self.weights, "shape", None)
        return tuple(shape(name)) if callable(shape) else tuple(self.weights[name].shape)
