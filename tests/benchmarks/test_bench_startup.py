"""bench/startup.py end to end on the CPU: it writes a sharded HF safetensors directory of a small dense Llama
(~240 MB of bf16), starts our engine from it in fresh processes (cold: the files dropped from the page cache;
warm), and reports what the GPU run reports. The same run shows loading holds no second host copy of the
weights: the engine's peak host memory grows by less than 1.3x the checkpoint (on the CPU the weights themselves
stay in host memory, so one copy is 1x)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from bench import startup
from bench.shapes import shape
from bench.startup_probe import vllm_weights_seconds

SMALL_LLAMA = {
    **shape("llama-3.1-8b"),
    "vocab_size": 16384, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 6,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 128, "bos_token_id": 1, "eos_token_id": 2,
    "max_position_embeddings": 4096,
}  # fmt: skip
# bf16 bytes: embeddings and lm_head 2 x 16384 x 1024, per layer q/o 2 x 1024^2, k/v 2 x 512 x 1024,
# gate/up/down 3 x 4096 x 1024, two norms; the final norm
PARAMS = 2 * 16384 * 1024 + 6 * (2 * 1024 * 1024 + 2 * 512 * 1024 + 3 * 4096 * 1024 + 2 * 1024) + 1024
SHARD_GB = 0.1


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("startup")
    (root / "config.json").write_text(json.dumps(SMALL_LLAMA))
    out = root / "results"
    args = ["--config", str(root / "config.json"), "--dir", str(root / "ckpt"), "--device", "cpu"]
    rc = startup.main([*args, "--shard-gb", str(SHARD_GB), "--out-dir", str(out)])
    files = sorted(out.glob("startup-cpu-config-*.json"))
    assert len(files) == 1 and files[0].with_name(files[0].stem + ".md").is_file()
    summary = json.loads(files[0].read_text())
    # a second invocation finds the finished directory and reuses it
    rc2 = startup.main([*args, "--runs", "warm", "--out-dir", str(root / "again")])
    again = json.loads(next((root / "again").glob("*.json")).read_text())
    return {"rc": rc, "rc2": rc2, "summary": summary, "again": again, "dir": root / "ckpt"}


def test_the_checkpoint_is_a_sharded_hf_directory_with_every_weight(bench_run):
    d: Path = bench_run["dir"]
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) == 3  # ~239 MB in shards of at most 100 MB: embeddings, lm_head, layer 0 | 1-3 | 4-5
    assert json.loads((d / "config.json").read_text()) == SMALL_LLAMA
    names = {}
    for f in shards:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118
                names[k] = (f.name, st.get_slice(k).get_shape())
    assert set(index["weight_map"]) == set(names)
    assert all(index["weight_map"][k] == f for k, (f, _) in names.items())
    assert names["model.layers.5.self_attn.k_proj.weight"][1] == [512, 1024]
    assert names["lm_head.weight"][1] == [16384, 1024]
    assert sum(1 for k in names if k.startswith("model.layers.")) == 6 * 9
    assert index["metadata"]["total_size"] == 2 * PARAMS
    write = bench_run["summary"]["write"]
    assert write["reused"] is False and write["write_s"] > 0
    assert write["bytes"] == sum(f.stat().st_size for f in shards)
    assert bench_run["again"]["write"]["reused"] is True and bench_run["rc2"] == 0


def test_each_run_reports_start_up_of_our_engine_from_the_files(bench_run):
    s = bench_run["summary"]
    assert bench_run["rc"] == 0, s["runs"]
    assert [(r["engine"], r["kind"]) for r in s["runs"]] == [("ours", "cold"), ("ours", "warm")]
    size = s["write"]["bytes"]
    for r in s["runs"]:
        assert r["checkpoint_bytes"] == size
        assert 0 < r["weights_s"] < r["ready_s"]
        assert r["weights_gb_s"] == pytest.approx(size / r["weights_s"] / 1e9)
        assert len(r["first_token"]) == 1 and 0 <= r["first_token"][0] < SMALL_LLAMA["vocab_size"]
    cold = s["runs"][0]
    assert cold["cache_drop"] == "fadvise_dontneed"
    assert cold["io"]["read_bytes"] >= 0.9 * size  # the drop took: the cold run read the weights from storage
    assert s["ratios"] == {}  # no peer ran, so no ratio
    assert s["host"]["command"].startswith("python -m bench.startup --config")


def test_loading_holds_no_second_host_copy_of_the_weights(bench_run):
    for r in bench_run["summary"]["runs"]:
        grown = r["host_peak_grown"]
        size = r["checkpoint_bytes"]
        assert grown < 1.3 * size, f"{r['kind']}: peak host memory grew {grown / 1e6:.0f} MB for {size / 1e6:.0f} MB"


def test_ratios_pair_runs_of_the_same_kind_only():
    runs = [
        {"engine": "ours", "kind": "cold", "ready_s": 30.0, "weights_s": 6.0},
        {"engine": "vllm", "kind": "cold", "ready_s": 60.0, "weights_s": 8.0},
        {"engine": "ours", "kind": "warm", "ready_s": 20.0, "weights_s": 2.0},
        {"engine": "vllm", "kind": "warm", "error": "did not start within 100 s"},
    ]
    assert startup.ratios(runs) == {"cold": {"ready_s": 0.5, "weights_s": 0.75}}


def test_shards_stay_under_their_size_unless_one_tensor_is_larger():
    shapes = {"a": (10,), "b": (20,), "c": (100,), "d": (5,), "e": (5,)}
    assert startup.plan_shards(shapes, 2, 64) == [["a", "b"], ["c"], ["d", "e"]]


def test_vllm_weights_seconds_come_from_its_loader_log_line():
    runner = "Model loading took 14.2488 GiB and 5.173644 seconds"
    assert vllm_weights_seconds([runner, "Loading weights took 3.22 seconds"]) == 3.22
    assert vllm_weights_seconds(["Starting to load model", runner]) == 5.173644
    assert vllm_weights_seconds(["Starting to load model"]) is None
