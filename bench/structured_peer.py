"""The vLLM column of bench/structured.py: vLLM 0.26.0 on the same structured-output workload, in its own process
(vLLM's pinned packages differ from ours), with vLLM installed by shared/gpu/vllm-install.sh into /tmp/vsite.
bench.structured starts it (--peer vllm) on a model directory it wrote (write_model_dir); by hand:

    PYTHONPATH=/tmp/vsite:$PWD VLLM_ENABLE_V1_MULTIPROCESSING=0 python3 -m bench.structured_peer \
        --model-dir DIR --batches 1,64,256 --output-len 256 --json-out /tmp/structured-peer.json

Everything the workload is (prompts, schema, sampling, limits, warm-up, compile schemas) comes from bench.structured,
which imports only the standard library at module level. vLLM's structured-output backend is xgrammar, the one its
"auto" setting picks for this schema (recorded as checked below), with disable_any_whitespace so both engines emit
JSON without free whitespace (xgrammar keeps ", " and ": " as separators, we write none); vLLM accepts
disable_any_whitespace only with a named backend.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.gpu_info import gpu_identity
from bench.structured import (
    COMPILE_COUNT,
    JSON_START,
    OUTPUT_LEN,
    SCHEMA,
    SETTINGS,
    TYPICAL_SCHEMA,
    TYPICAL_START,
    compile_schemas,
    parse_batches,
    percentiles_ms,
    prompts,
    workload,
)

BACKEND = "xgrammar"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True, type=Path, help="config.json and SmolLM2's tokenizer files")
    p.add_argument("--batches", default="1,64,256")
    p.add_argument("--output-len", type=int, default=OUTPUT_LEN)
    p.add_argument("--compile-count", type=int, default=COMPILE_COUNT)
    p.add_argument("--json-out", required=True, type=Path)
    p.add_argument("--typical", type=int, choices=(0, 1), default=1, help="also run the typical agent schema (1)")
    args = p.parse_args(argv)
    try:
        args.batches = parse_batches(args.batches)
    except ValueError as e:
        p.error(str(e))
    files = ("config.json", "tokenizer.json", "tokenizer_config.json")
    missing = [f for f in files if not (args.model_dir / f).is_file()]
    if missing:
        p.error(f"--model-dir {args.model_dir} lacks {', '.join(missing)} (bench.structured.write_model_dir writes it)")
    if args.output_len < 1 or args.compile_count < 1:
        p.error("--output-len and --compile-count must be at least 1")
    return args


def llm_kwargs(model_dir: Path, max_num_seqs: int) -> dict[str, Any]:
    """vLLM's LLM(...) arguments: the shared limits, dummy weights, the tokenizer (structured outputs need one)."""
    return {
        "model": str(model_dir),
        "load_format": "dummy",
        "dtype": "bfloat16",
        "max_num_seqs": max_num_seqs,
        **SETTINGS,
        "structured_outputs_config": {"backend": BACKEND, "disable_any_whitespace": True},
        "disable_log_stats": True,
    }


def _generate(
    llm: Any, batch: int, constrained: bool | None, output_len: int, check: Any, typical: bool = False
) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    schema = TYPICAL_SCHEMA if typical else SCHEMA
    spec = StructuredOutputsParams(json=schema) if constrained is not False else None
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, detokenize=False,
                            structured_outputs=spec)  # fmt: skip
    inputs = [{"prompt_token_ids": p} for p in prompts(batch, constrained, typical)]
    t = time.perf_counter()
    outs = llm.generate(inputs, params, use_tqdm=False)
    wall = time.perf_counter() - t
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    row: dict[str, Any] = {"wall_s": wall, "output_tokens": tokens, "output_tok_s": tokens / wall}
    if spec is not None:  # the schema held: each answer decodes to the start of the schema's JSON
        row["json_prefix_ok"] = sum(check(o.outputs[0].token_ids) for o in outs)
        row["requests"] = len(outs)
    return row


def auto_backend() -> str:
    """The backend vLLM's "auto" would pick for SCHEMA: xgrammar when its validation accepts the schema."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams
    from vllm.v1.structured_output.backend_xgrammar import validate_xgrammar_grammar

    try:
        validate_xgrammar_grammar(SamplingParams(structured_outputs=StructuredOutputsParams(json=SCHEMA)))
        return "xgrammar"
    except ValueError as e:
        return f"not xgrammar ({e})"


def compile_times(llm: Any, count: int) -> dict[str, Any]:
    """Compile + first token mask of `count` distinct schemas through the backend object vLLM's engine core built
    (its tokenizer info and compiler settings), on this thread: what vLLM's compile thread does per new schema."""
    from vllm.sampling_params import StructuredOutputsParams
    from vllm.v1.structured_output.request import get_structured_output_key

    backend = llm.llm_engine.engine_core.engine_core.structured_output_manager.backend
    if backend is None:
        return {"error": "vLLM built no structured-output backend"}
    bitmask = backend.allocate_token_bitmask(1)
    times = []
    for schema in compile_schemas(count):
        kind, grammar_spec = get_structured_output_key(StructuredOutputsParams(json=schema))
        t = time.perf_counter()
        grammar = backend.compile_grammar(kind, grammar_spec)
        grammar.fill_bitmask(bitmask, 0)
        times.append(time.perf_counter() - t)
    return {**percentiles_ms(times), "backend": type(backend).__name__}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm
    from vllm import LLM

    result: dict[str, Any] = {
        "engine": "vllm",
        "version": vllm.__version__,
        "backend": BACKEND,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu_identity": gpu_identity(),
        "workload": workload(args.batches, args.output_len, args.compile_count, bool(args.typical)),
        "rows": [],
        "notes": [],
    }

    def save() -> None:
        args.json_out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    result["auto_backend"] = auto_backend()
    if result["auto_backend"] != BACKEND:
        result["notes"].append(f"vLLM's auto setting would not pick {BACKEND} here: {result['auto_backend']}")
    save()
    t = time.perf_counter()
    llm = LLM(**llm_kwargs(args.model_dir, max(args.batches)))
    result["startup_s"] = time.perf_counter() - t
    scheduler = getattr(getattr(llm.llm_engine, "vllm_config", None), "scheduler_config", None)
    result["async_scheduling"] = getattr(scheduler, "async_scheduling", None)
    tokenizer = llm.get_tokenizer()

    def check(ids: Any) -> bool:
        return JSON_START.match(tokenizer.decode(list(ids))) is not None

    def check_typical(ids: Any) -> bool:
        return TYPICAL_START.match(tokenizer.decode(list(ids))) is not None

    warm = _generate(llm, result["workload"]["warmup_batch"], None, args.output_len, check)
    result["warmup"] = warm
    save()
    try:
        result["compile"] = compile_times(llm, args.compile_count)
    except Exception as e:  # an internal layout of another vLLM version: said, never guessed
        result["compile"] = {"error": f"{type(e).__name__}: {e}"}
    save()
    for b in args.batches:
        free = _generate(llm, b, False, args.output_len, check)
        constrained = _generate(llm, b, True, args.output_len, check)
        row = {"batch": b, "unconstrained": free, "constrained": constrained}
        result["rows"].append(row)
        if args.typical:
            row["typical"] = _generate(llm, b, True, args.output_len, check_typical, typical=True)
            if row["typical"]["json_prefix_ok"] != row["typical"]["requests"]:
                result["notes"].append(f"batch {b}: typical-schema answers not starting {TYPICAL_START.pattern}")
        if constrained["json_prefix_ok"] != constrained["requests"]:
            result["notes"].append(
                f"batch {b}: {constrained['requests'] - constrained['json_prefix_ok']} constrained answers do not "
                f"start as the schema's JSON ({JSON_START.pattern})"
            )
        print(f"vllm batch {b}: {free['output_tok_s']:,.0f} / {constrained['output_tok_s']:,.0f} tok/s", flush=True)
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
