"""bench/structured.py's bookkeeping on a CPU machine without vLLM: the model directory vLLM gets (transformers reads
it as SmolLM2's tokenizer on the Llama-3.1-8B shape), one workload for both processes, the ratio table, a peer that
failed or ran elsewhere printing "not measured" and no ratio, and clear errors for bad arguments."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench import structured, structured_peer
from bench.shapes import LLAMA_3_1_8B

GPU_A = {"host": "h", "gpus": [{"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-aaaa"}]}
GPU_B = {"host": "h", "gpus": [{"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-bbbb"}]}


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory, embedded_model_path) -> Path:
    """SmolLM2's tokenizer.json as `--dump-tokenizer` writes it (the loader's GGUF conversion)."""
    path = tmp_path_factory.mktemp("tok") / "smollm2-tokenizer.json"
    structured.main(["--dump-tokenizer", str(path)])
    return path


def _row(batch: int, u: float, c: float) -> dict:
    return {"batch": batch, "unconstrained": {"output_tok_s": u}, "constrained": {"output_tok_s": c}}


def _runs(peer_gpu: dict = GPU_A, peer_output_len: int = 256) -> tuple[dict, dict]:
    ours = {
        "gpu_identity": GPU_A,
        "workload": structured.workload([1, 64], 256, 100),
        "rows": [_row(1, 100.0, 95.0), _row(64, 4000.0, 3800.0)],
        "compile": {"p50_ms": 1.5, "p99_ms": 4.25, "count": 100},
    }
    peer = {
        "version": "0.26.0",
        "backend": "xgrammar",
        "gpu_identity": peer_gpu,
        "workload": structured.workload([1, 64], peer_output_len, 100),
        "rows": [_row(1, 110.0, 80.0), _row(64, 4400.0, 2000.0)],
        "compile": {"p50_ms": 30.0, "p99_ms": 61.0, "count": 100},
    }
    return ours, peer


def test_the_model_directory_is_smollm2s_tokenizer_on_the_llama_shape(tmp_path, tokenizer_file):
    from transformers import AutoConfig, AutoTokenizer

    model_dir = structured.write_model_dir(tmp_path, tokenizer_file.read_text())
    cfg = AutoConfig.from_pretrained(model_dir)
    assert (cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id) == (49152, 1, 2)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == (4096, 32, 8)
    written = json.loads((model_dir / "config.json").read_text())
    assert {k: v for k, v in written.items() if k not in ("vocab_size", "bos_token_id", "eos_token_id")} == {
        k: v for k, v in LLAMA_3_1_8B.items() if k not in ("vocab_size", "bos_token_id", "eos_token_id")
    }
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.is_fast and len(tok) == 49152
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id) == ("<|im_start|>", 1, "<|im_end|>", 2)
    text = '{"items":["a b","x 12"]} and some words'
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    # the same ids as our engine's tokenizer gives (one vocabulary for both engines)
    from tokenizers import Tokenizer

    assert Tokenizer.from_str(tokenizer_file.read_text()).encode(text, add_special_tokens=False).ids == ids
    # a plain byte-level decoder: grammar libraries (xgrammar, llguidance) then read "Ġ" as a space
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    assert spec["decoder"]["type"] == "ByteLevel"
    space_t = tok.convert_tokens_to_ids("Ġt")
    assert tok.decode([space_t]) == " t"


def test_both_processes_run_the_same_prompts_and_workload(tmp_path):
    assert structured.prompts(64, True) == structured.prompts(64, True)
    runs = [structured.prompts(b, c) for b in (1, 64, 256) for c in (False, True)] + [structured.prompts(8, None)]
    firsts = [tuple(r[0]) for r in runs]
    assert len(set(firsts)) == len(firsts)  # no run reuses another's prompt blocks from the prefix cache
    assert all(len(p) == 128 and all(100 <= t < 49152 for t in p) for r in runs for p in r)
    assert [len(r) for r in runs[:2]] == [1, 1] and len(structured.prompts(256, False)) == 256

    model_dir = tmp_path / "m"
    model_dir.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (model_dir / f).write_text("{}")
    cmd = structured.peer_command("python3", model_dir, [1, 64, 256], 128, 50, tmp_path / "p.json")
    assert cmd[:3] == ["python3", "-m", "bench.structured_peer"]
    args = structured_peer.parse_args(cmd[3:])
    assert (args.batches, args.output_len, args.compile_count, args.model_dir) == ([1, 64, 256], 128, 50, model_dir)
    ours = structured.workload([1, 64, 256], 128, 50)
    assert structured.workload(args.batches, args.output_len, args.compile_count) == ours
    assert ours["settings"]["max_num_seqs"] == 256 and ours["warmup_batch"] == 8
    kwargs = structured_peer.llm_kwargs(model_dir, 256)
    for key in ("max_model_len", "max_num_batched_tokens", "gpu_memory_utilization", "block_size", "seed"):
        assert kwargs[key] == ours["settings"][key]
    assert kwargs["max_num_seqs"] == 256 and kwargs["load_format"] == "dummy"
    assert "skip_tokenizer_init" not in kwargs  # vLLM refuses structured outputs without a tokenizer
    assert kwargs["structured_outputs_config"] == {"backend": "xgrammar", "disable_any_whitespace": True}


def test_the_answer_check_takes_both_engines_json_separators():
    for text in ('{"items":["ab","c"', '{"items": ["ab", "c"', '{ "items" : [ "'):
        assert structured.JSON_START.match(text), text
    for text in ('{"item":["a"', '"items":["a"', '{"items":[1', "{}"):
        assert not structured.JSON_START.match(text), text


def test_compile_schemas_are_distinct_and_percentiles_are_by_rank():
    schemas = structured.compile_schemas(100)
    assert len({json.dumps(s, sort_keys=True) for s in schemas}) == 100
    times = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    p = structured.percentiles_ms(list(reversed(times)))
    assert p["p50_ms"] == pytest.approx(50.5) and p["p99_ms"] == pytest.approx(100.0) and p["count"] == 100


def test_the_table_has_both_engines_and_the_ratios():
    ours, peer = _runs()
    table = structured.combine(ours, peer)
    one, many = table
    assert one["ours_constrained_vs_unconstrained"] == pytest.approx(0.95)
    assert one["vllm_constrained_vs_unconstrained"] == pytest.approx(80 / 110)
    assert one["ours_vs_vllm_constrained"] == pytest.approx(95 / 80)
    assert one["ours_vs_vllm_unconstrained"] == pytest.approx(100 / 110)
    assert many["ours_vs_vllm_constrained"] == pytest.approx(1.9)
    assert many["vllm_constrained"] == 2000.0
    md = structured.markdown({**ours, "peer": peer, "table": table})
    assert "| 1 | 100 | 95.00 | 0.95x | 110 | 80.00 | 0.73x | 1.19x | 0.91x |" in md
    assert "| 64 | 4,000 | 3,800 | 0.95x | 4,400 | 2,000 | 0.45x | 1.90x | 0.91x |" in md
    assert "ours (llguidance): p50 1.50 ms, p99 4.25 ms over 100 schemas" in md
    assert "vLLM 0.26.0 (xgrammar): p50 30.00 ms, p99 61.00 ms over 100 schemas" in md
    assert "not measured" not in md


@pytest.mark.parametrize(
    ("peer_change", "why"),
    [
        ({"gpu_identity": GPU_B}, "the peer ran on other GPUs"),
        ({"workload": structured.workload([1, 64], 128, 100)}, "the peer ran another workload (output_len differ)"),
        ({"error": "vLLM exited with status 1"}, "vLLM exited with status 1"),
    ],
)
def test_a_peer_from_elsewhere_or_that_failed_gives_no_ratio(peer_change, why):
    ours, peer = _runs()
    peer.update(peer_change)
    table = structured.combine(ours, peer)
    assert all(r["vllm_constrained"] is None and r["ours_vs_vllm_constrained"] is None for r in table)
    assert table[0]["ours_constrained_vs_unconstrained"] == pytest.approx(0.95)  # ours stand
    md = structured.markdown({**ours, "peer": peer, "table": table})
    assert f"vLLM 0.26.0: not measured ({why}" in md
    assert "vLLM 0.26.0 (xgrammar): not measured" in md  # its compile times neither
    assert "1.19x" not in md and "| 1 | 100 | 95.00 | 0.95x | not measured | not measured | - | - | - |" in md


def test_no_peer_and_a_peer_without_compile_times_say_not_measured():
    ours, peer = _runs()
    md = structured.markdown({**ours, "peer": None, "table": structured.combine(ours, None)})
    assert "vLLM: not measured (not run (--peer none))" in md
    peer["compile"] = {"error": "AttributeError: 'InprocClient' object has no attribute 'engine_core'"}
    md = structured.markdown({**ours, "peer": peer, "table": structured.combine(ours, peer)})
    assert "vLLM 0.26.0 (xgrammar): not measured (AttributeError" in md
    assert "1.19x" in md  # the throughput figures still stand


def test_a_failed_peer_process_keeps_what_it_wrote(tmp_path):
    out = tmp_path / "peer.json"
    fail = [sys.executable, "-c", "import sys; sys.exit(3)"]
    assert structured.run_peer(fail, "/nonexistent", out, 60) == {
        "error": "vLLM exited with status 3",
        "notes": ["vLLM exited with status 3"],
    }
    partial = {"version": "0.26.0", "rows": [_row(1, 110.0, 80.0)], "notes": []}
    script = f"import sys; open({str(out)!r}, 'w').write({json.dumps(partial)!r}); sys.exit(1)"
    write_then_fail = [sys.executable, "-c", script]
    peer = structured.run_peer(write_then_fail, "/nonexistent", out, 60)
    assert "error" not in peer and peer["rows"] == partial["rows"]
    assert peer["notes"] == ["vLLM exited with status 1"]


def _error(capsys, argv: list[str], module=structured) -> str:
    with pytest.raises(SystemExit) as e:
        module.parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_bad_arguments_are_clear_errors(tmp_path, capsys, tokenizer_file):
    tok = str(tokenizer_file)
    assert "--tokenizer-json is required" in _error(capsys, [])
    for bad in ("0,64", "1,x", ""):
        assert "--batches must be a comma list of positive integers" in _error(
            capsys, ["--tokenizer-json", tok, "--batches", bad]
        )
    assert "cannot read the tokenizer file" in _error(capsys, ["--tokenizer-json", str(tmp_path / "none.json")])
    (tmp_path / "t.json").write_text("{not json")
    assert "is not JSON" in _error(capsys, ["--tokenizer-json", str(tmp_path / "t.json")])
    (tmp_path / "t.json").write_text('{"model": {}}')
    assert "not a Hugging Face tokenizer.json" in _error(capsys, ["--tokenizer-json", str(tmp_path / "t.json")])
    (tmp_path / "t.json").write_text('{"model": {"vocab": {"a": 0, "b": 1}}}')
    assert "has 2 tokens, SmolLM2's has 49152" in _error(capsys, ["--tokenizer-json", str(tmp_path / "t.json")])
    assert "no peer" in _error(capsys, ["--tokenizer-json", tok, "--smoke", "--peer", "vllm"])
    assert "exclude each other" in _error(capsys, ["--tokenizer-json", tok, "--peer", "vllm", "--peer-json", "x"])
    assert "--output-len must be at least 1" in _error(capsys, ["--tokenizer-json", tok, "--output-len", "0"])
    args = structured.parse_args(["--tokenizer-json", tok, "--batches", "1,64,256", "--output-len", "128"])
    assert (args.batches, args.output_len) == ([1, 64, 256], 128)
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _error(capsys, ["--model-dir", str(empty), "--json-out", "x"], structured_peer)
    assert "lacks config.json, tokenizer.json, tokenizer_config.json" in err


@pytest.mark.slow
def test_the_smoke_run_writes_one_results_file_with_the_peer_not_measured(tmp_path, tokenizer_file):
    """Our engine end to end on the CPU (SmolLM2's shape, batches 1 and 4, 16 tokens): the answers hold the schema
    (run_batch checks them) and the results name what was and was not measured."""
    argv = ["--smoke", "--tokenizer-json", str(tokenizer_file), "--out-dir", str(tmp_path),
            "--batch-accept-compare", "1", "--reuse-compare", "1"]  # fmt: skip
    assert structured.main(argv) == 0
    (md,) = tmp_path.glob("structured-*.md")
    (js,) = tmp_path.glob("structured-*.json")
    result = json.loads(js.read_text())
    assert [r["batch"] for r in result["rows"]] == [1, 4]
    assert all(r["constrained"]["output_tokens"] == 16 * r["batch"] for r in result["rows"])
    assert result["compile"]["count"] == 10
    text = md.read_text()
    assert "vLLM: not measured (not run (--peer none)): no ratio to it." in text
    assert "| 4 |" in text and "CPU (smoke run)" in text
    for row in result["rows"]:  # the typical schema and the prefetcher's switch both ways, each answer checked
        assert row["typical"]["output_tokens"] == 16 * row["batch"]
        assert {row["constrained"]["host"]["prefetch"], row["constrained_flipped"]["host"]["prefetch"]} == {False, True}
        flipped = row["constrained_batch_flipped"]["host"]  # KUBELLM_GRAMMAR_BATCH_ACCEPT flipped, prefetch as set
        assert (flipped["batch_accept"], row["constrained"]["host"]["batch_accept"]) == (True, False)
        assert flipped["prefetch"] == row["constrained"]["host"]["prefetch"]
        runs = [row[k] for k in ("constrained", "constrained_reuse_flipped", "constrained_direct_flipped")]
        assert [r["host"]["step_reuse"] for r in runs] == [True, False, True], "KUBELLM_GRAMMAR_STEP_REUSE flipped"
        assert not runs[2]["host"]["direct_masks"], "the CPU has no pinned buffers: nothing to fill directly"
        assert all(r["output_tokens"] == 16 * row["batch"] for r in runs)
    probe = result["fill_probe"]
    assert probe["rows"] == 64 and probe["one_thread_ms"] > 0 and probe["pool_threads"] >= 1
    assert "Fill probe (the benchmark schema's costliest state" in text
    assert "Typical agent schema" in text and "| 4 | bench | on |" in text and "| 4 | bench | off |" in text


def test_structured_host_runs_and_reports_lineages_beside_one_lineage(tmp_path, tokenizer_file):
    """bench/structured_host part 1 at a small size: each schema's row names its grammar's lineages (a pool of 2:
    up to 8) and the one-lineage fill beside it; the markdown records the load average."""
    from bench import structured_host

    argv = ["--tokenizer-json", str(tokenizer_file), "--batches", "1,4", "--steps", "2", "--threads", "2",
            "--engine-batch", "0", "--slices", "0", "--critical-batch", "4", "--critical-work-ms", "1",
            "--out-dir", str(tmp_path)]  # fmt: skip
    assert structured_host.main(argv) == 0
    (js,) = tmp_path.glob("structured-host-*.json")
    result = json.loads(js.read_text())
    rows = result["grammar"]["bench (maxLength 8, minItems 200)"]
    assert [r["batch"] for r in rows] == [1, 4]
    assert rows[1]["lineages"] == 8, "built by the fill probe's 64 rows: 4 per fill thread (kept while idle a minute)"
    assert all(r["fill_one_lineage_ms"] > 0 and r["fill_ms"] > 0 for r in rows)
    assert result["fill_probe"]["roots"] == 8, "64 rows over a pool of 2: 8 lineages"
    text = (tmp_path / js.name.replace(".json", ".md")).read_text()
    assert (
        "Load average (1, 5, 15 min) before the run" in text and "| bench (maxLength 8, minItems 200) | 4 | 8 |" in text
    )
    critical = {(r["schema"], r["mode"]): r for r in result["critical"]}  # part 4: every mode of both schemas
    assert len(critical) == 2 * 8 and all(r["batch"] == 4 and r["step_ms"] > 0 for r in critical.values())
    assert "| bench without maxLength | 4 | 1 | prefetch on, batched accepts, 0.5 ms |" in text


def test_structured_host_part_5_pairs_a_git_refs_grammar_code_with_this_checkouts(tmp_path, tokenizer_file):
    """bench/structured_host part 5 at a small size: git HEAD's engine/structured_output.py loaded beside this
    checkout's, every mode of both measured in the same run, the table naming whose code each row ran."""
    from bench import structured_host

    argv = ["--tokenizer-json", str(tokenizer_file), "--parts", "5", "--critical-batch", "4", "--critical-work-ms",
            "1", "--compare-steps", "2", "--compare-ref", "HEAD", "--out-dir", str(tmp_path)]  # fmt: skip
    assert structured_host.main(argv) == 0
    (js,) = tmp_path.glob("structured-host-*.json")
    rows = json.loads(js.read_text())["compare"]
    assert [(r["code"], r["mode"]) for r in rows[1:]] == [
        ("HEAD" if code == "ref" else code, label) for label, code, *_ in structured_host.COMPARE_MODES
    ]
    assert rows[0]["mode"].startswith("none") and all(r["step_ms"] > 0 and r["batch"] == 4 for r in rows)
    text = (tmp_path / js.name.replace(".json", ".md")).read_text()
    assert "| bench without maxLength | 4 | 1 | HEAD | engine path, batched accepts |" in text
    with pytest.raises(ValueError, match="cannot read"):
        structured_host.baseline_module("no-such-ref-anywhere")
