"""`Fp8Weights`: an FP8 checkpoint's tensors as the models read them.

Read through the Mapping interface, every weight comes back in the model dtype, FP8 ones dequantized with their
scales (the CPU torch path, and any layer the GPU path does not run in FP8); scale tensors are not entries of
their own. The GPU path asks `fp8(name)` instead and gets the FP8 weight with its scales untouched.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from .errors import ModelLoadError
from .quantization import FP8_DTYPE, SCALE_SUFFIXES, Fp8Scheme, dequantize


@dataclass
class Fp8Tensor:
    """One FP8 linear weight as the checkpoint stores it: weight [N, K] float8_e4m3fn, float32 scales."""

    weight: torch.Tensor
    scale: torch.Tensor  # 0-d (per tensor), [N] (per channel) or [ceil(N/bn), ceil(K/bk)] (block)
    input_scale: torch.Tensor | None  # static activation scale (0-d), None for dynamic
    block_size: tuple[int, int] | None


class Fp8Weights(Mapping[str, torch.Tensor]):
    """`raw`: the checkpoint's tensors in their stored dtypes (FP8 weights, float32 scales)."""

    def __init__(self, raw: Mapping[str, torch.Tensor], scheme: Fp8Scheme, dtype: torch.dtype):
        self.raw, self.scheme, self.dtype = raw, scheme, dtype
        self._names = [n for n in raw if not n.endswith(SCALE_SUFFIXES)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.raw and not name.endswith(SCALE_SUFFIXES)

    def is_fp8(self, name: str) -> bool:
        dtype_of = getattr(self.raw, "dtype_of", None)
        dtype = dtype_of(name) if dtype_of is not None else self.raw[name].dtype
        return dtype == FP8_DTYPE

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self:
            raise KeyError(name)
        if self.scheme.method == "online" or not self.is_fp8(name):  # online: the checkpoint holds no FP8
            tensor = self.raw[name]
            if tensor.dtype == torch.float8_e5m2:
                raise ModelLoadError(f"weight {name!r} is float8_e5m2; FP8 checkpoints are read in e4m3 only")
            return tensor.to(self.dtype) if tensor.is_floating_point() else tensor
        t = self.fp8(name)
        return dequantize(t.weight, t.scale, t.block_size).to(self.dtype)

    def fp8(self, name: str) -> Fp8Tensor:
        """The FP8 weight `name` (".weight") with its scales, as stored (scales as float32)."""
        module = name.removesuffix(".weight")
        scale_name = f"{module}.{self.scheme.scale_suffix}"
        if scale_name not in self.raw:
            raise ModelLoadError(f"FP8 weight {name!r} has no {self.scheme.scale_suffix} ({self.scheme.describe()})")
        weight, scale = self.raw[name], self.raw[scale_name].float()
        if self.scheme.weight_strategy != "block":
            scale = scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1)
        input_scale = None
        if self.scheme.activation == "static":
            if f"{module}.input_scale" not in self.raw:
                raise ModelLoadError(f"FP8 weight {name!r} has no input_scale (static activations)")
            input_scale = self.raw[f"{module}.input_scale"].float().max().reshape(())
        n, k = weight.shape[-2:]
        if self.scheme.block_size is not None:
            bn, bk = self.scheme.block_size
            expected: tuple[int, ...] = (*weight.shape[:-2], -(-n // bn), -(-k // bk))
            if tuple(scale.shape) != expected:
                raise ModelLoadError(
                    f"FP8 weight {name!r} {tuple(weight.shape)} in {bn}x{bk} blocks needs {self.scheme.scale_suffix} "
                    f"of shape {expected}, not {tuple(scale.shape)}"
                )
        elif scale.numel() not in (1, n):
            raise ModelLoadError(
                f"FP8 weight {name!r} {tuple(weight.shape)}: a scale of {scale.numel()} values is neither per "
                f"tensor nor per channel"
            )
        return Fp8Tensor(weight, scale, input_scale, self.scheme.block_size)

    def kv_scales(self, layer_prefix: str) -> tuple[float, float] | None:
        """The checkpoint's KV-cache scales of one attention layer (`{layer}.self_attn`), None when it has none."""
        k, v = f"{layer_prefix}.k_scale", f"{layer_prefix}.v_scale"
        if k in self.raw and v in self.raw:
            return float(self.raw[k].float().max()), float(self.raw[v].float().max())
        if f"{layer_prefix}.kv_scale" in self.raw:  # older checkpoints: one scale for both
            s = float(self.raw[f"{layer_prefix}.kv_scale"].float().max())
            return s, s
        return None

    # shape / read_slice: what engine/parallel.py asks of a mapping to shard it (dequantized whole, then cut).
    def shape(self, name: str) -> tuple[int, ...]:
        shape = getattr(self.raw, "shape", None)
        return tuple(shape(name)) if callable(shape) else tuple(self.raw[name].shape)

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Unquantized tensors sliced by the underlying mapping where it can (reading only the slice); FP8 ones
        dequantized whole, then cut (their scales do not split along every dimension)."""
        if self.scheme.method == "online" or not self.is_fp8(name):
            read = getattr(self.raw, "read_slice", None)
            if read is not None:
                tensor = read(name, dim, start, stop)
            else:  # its own storage, not a view keeping the whole tensor alive
                tensor = self.raw[name].narrow(dim, start, stop - start).clone()
            return tensor.to(self.dtype) if tensor.is_floating_point() else tensor
        return self[name].narrow(dim, start, stop - start).clone()
