"""A GGUF reader that parses metadata arrays in bulk.

`gguf.GGUFReader` builds one numpy view per array element, so a 262k-token vocabulary (tokens, scores and
token types: Gemma 3) costs ~11 s to open on one core before any tensor is touched. This reader walks the same
format (magic, version, counts, key/value metadata, tensor infos, aligned tensor data) with `struct` for
scalars, `np.frombuffer` for numeric arrays and one slicing pass for string arrays (~0.3 s for that vocabulary).
Tensor data stays in a read-only memory map; `GGUFTensor.data` has the layout `gguf.quants.dequantize` takes
(typed arrays for float/int tensors, rows of raw bytes for quantized ones), as `GGUFReader` gives it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types (gguf.GGUFValueType): numeric ones as (numpy dtype, struct format).
_NUMERIC = {
    0: ("<u1", "<B"),
    1: ("<i1", "<b"),
    2: ("<u2", "<H"),
    3: ("<i2", "<h"),
    4: ("<u4", "<I"),
    5: ("<i4", "<i"),
    6: ("<f4", "<f"),
    7: ("<u1", "<B"),  # bool
    10: ("<u8", "<Q"),
    11: ("<i8", "<q"),
    12: ("<f8", "<d"),
}
_BOOL, _STRING, _ARRAY = 7, 8, 9
# Tensor types stored as plain typed arrays (everything else is quantized blocks of bytes).
_PLAIN = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


class GGUFFormatError(ValueError):
    """The bytes are not a well-formed GGUF file (bad magic, unknown value type, truncated)."""


@dataclass
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: fastest-varying dimension first (as GGUFReader's `shape`)
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute offset in the file
    data: np.ndarray  # typed array or byte rows, numpy (reversed) dimension order; a view of the memory map


class GGUFFile:
    """`fields`: metadata key -> Python value (str, int, float, bool, or a list of them);
    `tensors`: tensor infos with their data, in file order."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.data = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._buf = memoryview(self.data)
        self._pos = 0
        if bytes(self._take(4)) != GGUF_MAGIC:
            raise GGUFFormatError("GGUF magic invalid")
        self.version = self._scalar("<I")
        if self.version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {self.version} is not supported (2 or 3)")
        n_tensors, n_kv = self._scalar("<Q"), self._scalar("<Q")
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._scalar("<I"))
        infos = [self._tensor_info() for _ in range(n_tensors)]
        alignment = int(self.fields.get("general.alignment", DEFAULT_ALIGNMENT))
        if alignment <= 0 or alignment & (alignment - 1):
            raise GGUFFormatError(f"invalid general.alignment {alignment}: must be a power of two")
        start = -(-self._pos // alignment) * alignment
        self.tensors: list[GGUFTensor] = []
        seen: set[str] = set()
        for name, dims, raw_type, offset in infos:
            if name in seen:
                raise GGUFFormatError(f"duplicated tensor {name!r}")
            seen.add(name)
            self.tensors.append(self._tensor(name, dims, raw_type, start + offset))

    # ---- primitive reads ---------------------------------------------------------------------------
    def _take(self, n: int) -> memoryview:
        end = self._pos + n
        if end > len(self._buf):
            raise GGUFFormatError(f"truncated: needs {end} bytes, the file has {len(self._buf)}")
        view = self._buf[self._pos : end]
        self._pos = end
        return view

    def _scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

    def _string(self) -> str:
        return str(self._take(self._scalar("<Q")), "utf-8", errors="replace")

    def _value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            itype, count = self._scalar("<I"), self._scalar("<Q")
            return self._array(itype, count)
        if vtype not in _NUMERIC:
            raise GGUFFormatError(f"unknown metadata value type {vtype}")
        value = self._scalar(_NUMERIC[vtype][1])
        return bool(value) if vtype == _BOOL else value

    def _array(self, itype: int, count: int) -> list[Any]:
        if itype in _NUMERIC:
            dtype = np.dtype(_NUMERIC[itype][0])
            values = np.frombuffer(self._take(count * dtype.itemsize), dtype=dtype)
            return values.astype(bool).tolist() if itype == _BOOL else values.tolist()
        if itype == _STRING:
            return self._string_array(count)
        return [self._value(itype) for _ in range(count)]  # nested arrays: rare, element by element

    def _string_array(self, count: int) -> list[str]:
        buf, pos, out = self._buf, self._pos, []
        size = len(buf)
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > size:
                raise GGUFFormatError("truncated string array")
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > size:
                raise GGUFFormatError("truncated string array")
            out.append(str(buf[pos : pos + n], "utf-8", errors="replace"))
            pos += n
        self._pos = pos
        return out

    def _tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string()
        n_dims = self._scalar("<I")
        dims = tuple(int(d) for d in np.frombuffer(self._take(8 * n_dims), dtype="<u8"))
        raw_type, offset = self._scalar("<I"), self._scalar("<Q")
        return name, dims, raw_type, offset

    def _tensor(self, name: str, dims: tuple[int, ...], raw_type: int, data_offset: int) -> GGUFTensor:
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError as e:
            raise GGUFFormatError(f"tensor {name!r} has unknown type {raw_type}") from e
        n_elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
        block, type_size = GGML_QUANT_SIZES[qtype]
        n_bytes = n_elements * type_size // block
        np_dims = tuple(reversed(dims))
        if data_offset + n_bytes > len(self.data):
            # kept as an empty view so callers can report which tensor runs past the end
            data = self.data[:0]
        elif qtype in _PLAIN:
            data = self.data[data_offset : data_offset + n_bytes].view(_PLAIN[qtype]).reshape(np_dims)
        else:
            data = self.data[data_offset : data_offset + n_bytes].reshape(quant_shape_to_byte_shape(np_dims, qtype))
        return GGUFTensor(name, qtype, dims, n_elements, n_bytes, data_offset, data)


__all__ = ["GGUFFile", "GGUFFormatError", "GGUFTensor"]
