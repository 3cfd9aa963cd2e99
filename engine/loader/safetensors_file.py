"""Read tensors (or slices of them) out of a .safetensors file with positioned reads into fresh tensors.

Why not `safetensors.safe_open`: it maps the whole file, and every page a read touches stays resident (counted in
the process's memory) until the handle closes, so keeping one handle per file holds a second copy of the checkpoint
while loading; opening a handle per tensor instead costs a header parse each time (~10 ms on a busy 2-core machine:
minutes for a MoE checkpoint of ~19k expert tensors). Here the header is parsed once and each read lands straight
in the tensor that keeps it: nothing but the tensors asked for is ever resident.

Format: 8 bytes little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}}
(offsets relative to the end of the header), then the data, row-major.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelLoadError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
# A slice along an inner dimension is read as one positioned read per outer index while there are at most this
# many of them; beyond, the whole tensor is read and the slice cut out of it (one tensor's worth of transient).
MAX_STRIDED_READS = 1024
STAGING_BYTES = 64 << 20  # each of the two host buffers a tensor streams to the GPU through
STAGING_READERS = 4  # threads filling a staging buffer at once (one reader rarely keeps an NVMe queue busy)
MIN_SPLIT_READ = 4 << 20  # a chunk smaller than this is read by one thread


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file


class SafetensorsFile:
    """One file's header, and reads from it through one descriptor (opened on first read)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self.entries = read_header(path)

    def read(self, name: str, dim: int = 0, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Tensor `name`, or its [start, stop) along `dim`, as a new tensor of the file's dtype."""
        e = self.entries[name]
        stop = e.shape[dim] if stop is None and e.shape else stop
        if not e.shape:
            return self._read_bytes(e.offset, e.dtype.itemsize).view(e.dtype).reshape(())
        outer, inner = math.prod(e.shape[:dim]), math.prod(e.shape[dim + 1 :]) * e.dtype.itemsize
        shape = (*e.shape[:dim], stop - start, *e.shape[dim + 1 :])
        if outer == 1:  # a contiguous byte range
            return self._read_bytes(e.offset + start * inner, (stop - start) * inner).view(e.dtype).reshape(shape)
        if outer > MAX_STRIDED_READS:
            return self.read(name).narrow(dim, start, stop - start).clone()
        out = torch.empty((outer, (stop - start) * inner), dtype=torch.uint8)
        block = e.shape[dim] * inner  # bytes of one outer index
        for i in range(outer):
            self._read_into(out[i], e.offset + i * block + start * inner)
        return out.view(e.dtype).reshape(shape)

    def read_to(self, name: str, staging: Staging) -> torch.Tensor:
        """Tensor `name` whole, made on `staging.device` and filled chunk by chunk through its host buffers: the
        tensor is never whole in host memory."""
        e = self.entries[name]
        out = torch.empty(e.shape, dtype=e.dtype, device=staging.device)
        if out.numel():
            staging.copy(self, e.offset, out.reshape(-1).view(torch.uint8))
        return out

    def _read_bytes(self, offset: int, n: int) -> torch.Tensor:
        buf = torch.empty(n, dtype=torch.uint8)
        self._read_into(buf, offset)
        return buf

    def _read_into(self, buf: torch.Tensor, offset: int) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        view, done = memoryview(buf.numpy()), 0
        while done < len(view):  # a read returns at most ~2 GiB at once
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n <= 0:
                raise ModelLoadError(f"corrupt or unreadable weights file {self.path}: unexpected end of file")
            done += n

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()


class Staging:
    """Two host buffers (pinned for a GPU) that file bytes pass through on their way to `device`: the disk fills one
    while the other is copied out, each copy a DMA from pinned memory, not a blocking copy of a pageable tensor
    through the driver's own bounce buffer, and host memory stays at two buffers whatever the tensor's size."""

    def __init__(self, device: torch.device, nbytes: int | None = None):
        self.device = device
        cuda = device.type == "cuda"
        size = nbytes or STAGING_BYTES
        self.buffers = [torch.empty(size, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
        self.done: list[torch.cuda.Event | None] = [None, None]  # when each buffer's last copy out finished
        self.cuda = cuda
        self._readers = ThreadPoolExecutor(STAGING_READERS, thread_name_prefix="safetensors-read")

    def copy(self, file: SafetensorsFile, offset: int, dest: torch.Tensor) -> None:
        """`dest.numel()` bytes of `file` from `offset` into the uint8 tensor `dest`, asynchronously on a GPU
        (later work on the current stream is ordered after it)."""
        pos, turn, size = 0, 0, self.buffers[0].numel()
        while pos < dest.numel():
            n = min(size, dest.numel() - pos)
            buf, event = self.buffers[turn], self.done[turn]
            if event is not None:
                event.synchronize()  # its previous chunk has left for the device: safe to overwrite
            self._fill(file, buf[:n], offset + pos)
            dest[pos : pos + n].copy_(buf[:n], non_blocking=self.cuda)
            if self.cuda:
                self.done[turn] = torch.cuda.Event()
                self.done[turn].record()  # type: ignore[union-attr]
            pos, turn = pos + n, 1 - turn

    def _fill(self, file: SafetensorsFile, buf: torch.Tensor, offset: int) -> None:
        """`buf` from `offset`, in STAGING_READERS positioned reads at once (os.preadv releases the GIL)."""
        n = buf.numel()
        if n < MIN_SPLIT_READ:
            file._read_into(buf, offset)
            return
        step = -(-n // STAGING_READERS)
        parts = [self._readers.submit(file._read_into, buf[i : i + step], offset + i) for i in range(0, n, step)]
        for part in parts:
            part.result()


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Every tensor's dtype, shape and data offset, checked against the file's size."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            meta = json.loads(f.read(n))
        if not isinstance(meta, dict):
            raise ValueError("header is not a JSON object")
        entries = {}
        for name, info in meta.items():
            if name == "__metadata__":
                continue
            dtype = _DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {name!r} has unsupported dtype {info['dtype']!r}")
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
            if end - begin != math.prod(shape) * dtype.itemsize or 8 + n + end > size or begin < 0:
                raise ValueError(f"tensor {name!r} ({info['dtype']} {list(shape)}) lies outside the file's data")
            entries[name] = TensorEntry(dtype, shape, 8 + n + begin)
        return entries
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"corrupt or unreadable weights file {path}: {e}") from e
