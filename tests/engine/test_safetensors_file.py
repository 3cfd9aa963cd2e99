"""The positioned-read safetensors reader gives what the safetensors library gives: whole tensors of each dtype,
and slices along every dimension (contiguous, strided, and cut from a whole read)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from kubellm.engine.loader import ModelLoadError
from kubellm.engine.loader import safetensors_file as sf
from kubellm.engine.loader.hf_dir import SafetensorsWeights


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "experts": torch.randn(6, 10, 8, generator=g).bfloat16(),
        "matrix": torch.randn(12, 7, generator=g),
        "vector": torch.randn(5, generator=g).half(),
        "ids": torch.arange(9, dtype=torch.int64),
        "scalar": torch.tensor(3.5),
    }
    path = tmp_path_factory.mktemp("st") / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, load_file(str(path))


def test_whole_tensors_equal_the_library(saved):
    path, ref = saved
    f = sf.SafetensorsFile(path)
    assert set(f.entries) == set(ref)
    for name, want in ref.items():
        got = f.read(name)
        assert got.dtype == want.dtype and torch.equal(got, want), name


@pytest.mark.parametrize("max_strided", [1024, 2])  # 2: slices of inner dimensions are cut from whole reads
def test_slices_along_every_dimension(saved, monkeypatch, max_strided):
    monkeypatch.setattr(sf, "MAX_STRIDED_READS", max_strided)
    path, ref = saved
    f = sf.SafetensorsFile(path)
    for name, dim, start, stop in [("experts", 0, 2, 5), ("experts", 1, 3, 8), ("experts", 2, 4, 8),
                                   ("matrix", 0, 0, 12), ("matrix", 1, 2, 3), ("vector", 0, 1, 4)]:  # fmt: skip
        want = ref[name].narrow(dim, start, stop - start)
        assert torch.equal(f.read(name, dim, start, stop), want), (name, dim, start, stop)


def test_a_data_offset_past_the_end_is_a_clear_error(saved, tmp_path):
    path, _ = saved
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-40])
    with pytest.raises(ModelLoadError, match=r"corrupt or unreadable weights file .*lies outside the file's data"):
        sf.SafetensorsFile(tmp_path / "cut.safetensors")


@pytest.mark.parametrize("staging_bytes", [7, 64, 1 << 20])  # chunks cutting elements, rows, or one chunk whole
@pytest.mark.parametrize("min_split", [1 << 30, 5])  # one reader per chunk; each chunk split among the readers
def test_streamed_reads_equal_the_library_whatever_the_chunk_size(saved, monkeypatch, staging_bytes, min_split):
    monkeypatch.setattr(sf, "MIN_SPLIT_READ", min_split)
    path, ref = saved
    f, staging = sf.SafetensorsFile(path), sf.Staging(torch.device("cpu"), staging_bytes)
    for name, want in ref.items():
        got = f.read_to(name, staging)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), name


def test_weights_streaming_to_a_device_read_whole_tensors_through_staging(saved, monkeypatch):
    path, ref = saved
    (path.parent / "model.safetensors").symlink_to(path)
    weights = SafetensorsWeights(path.parent, None).streaming_to(torch.device("cpu"))
    reads = []
    monkeypatch.setattr(sf.SafetensorsFile, "read", lambda *a, **k: reads.append(a) or None)  # not the host read
    for name, want in ref.items():
        assert torch.equal(weights[name], want), name
    assert reads == []
