"""Our GGUF reader (engine/loader/gguf_reader.py) reads what `gguf.GGUFReader` reads, without its per-element cost
on large vocabularies, and our torch Q8_0 dequantization gives gguf's numbers exactly."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from kubellm.engine.loader.gguf_file import dequantize_tensor
from kubellm.engine.loader.gguf_reader import GGUFFile, GGUFFormatError


def test_fields_and_tensors_equal_gguf_reader(embedded_model_path):
    ours, ref = GGUFFile(embedded_model_path), gguf.GGUFReader(str(embedded_model_path))
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert list(ours.fields) == keys
    for key in keys:
        expected = ref.fields[key].contents()
        assert ours.fields[key] == expected and type(ours.fields[key]) is type(expected), key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors, strict=True):
        assert (a.tensor_type, a.shape, a.n_bytes, a.data_offset) == (
            b.tensor_type,
            tuple(b.shape.tolist()),
            b.n_bytes,
            b.data_offset,
        )
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
        assert np.array_equal(a.data.view(np.uint8), b.data.view(np.uint8)), a.name


def test_q8_0_dequantization_equals_gguf(tmp_path):
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal((48, 96)) * rng.uniform(0.01, 10, (48, 1))).astype(np.float32)
    path = tmp_path / "q8.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor(
        "t", gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0
    )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (t,) = GGUFFile(path).tensors
    ours = dequantize_tensor(t).numpy()
    assert ours.shape == (48, 96) and np.array_equal(ours, gguf.quants.dequantize(t.data, t.tensor_type))


def test_malformed_files_raise_format_errors(tmp_path, embedded_model_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(64))
    with pytest.raises(GGUFFormatError, match="magic"):
        GGUFFile(bad)
    with open(embedded_model_path, "rb") as f:
        bad.write_bytes(f.read(5000))  # cut inside the vocabulary
    with pytest.raises(GGUFFormatError, match="truncated"):
        GGUFFile(bad)
