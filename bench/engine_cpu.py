"""CPU throughput of the engine on the embedded SmolLM2-135M, beside transformers' batched `generate` on the
same prompts in the same run (a baseline to watch, not a target).

Workload: N requests (default 32), prompts of 64-200 tokens drawn with a fixed seed from a word list,
greedy, ignore_eos, M output tokens each (default 32); all submitted at once. transformers runs the same
prompts left-padded in batches of 8 (its static batching; float32, same dequantized weights).

    python -m bench.engine_cpu [--requests 32] [--output-tokens 32]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import subprocess
import time
from pathlib import Path

from kubellm.builtin_models import builtin_model_path
from kubellm.engine.config import EngineConfig
from kubellm.engine.llm_engine import LLMEngine
from kubellm.engine.sampling_params import SamplingParams

WORDS = ["river", "stone", "light", "quiet", "market", "engine", "garden", "history", "number", "silver", "paper"]
RESULTS = Path(__file__).parent / "results"


def make_prompts(engine: LLMEngine, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        length = rng.randint(64, 200)
        ids = engine.renderer.encode(" ".join(rng.choice(WORDS) for _ in range(length)))
        prompts.append(ids[:length])
    return prompts


def run_engine(engine: LLMEngine, prompts: list[list[int]], out_tokens: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=out_tokens, ignore_eos=True)
    start = time.perf_counter()
    for p in prompts:
        engine.add_request(None, p, params)
    ttft, finished = [], 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished += 1
                ttft.append(out.metrics.first_token_time - out.metrics.arrival_time)
    wall = time.perf_counter() - start
    gen = len(prompts) * out_tokens
    return {"wall_s": wall, "output_tok_s": gen / wall, "total_tok_s": (gen + sum(map(len, prompts))) / wall,
            "ttft_p50_s": sorted(ttft)[len(ttft) // 2]}  # fmt: skip


def run_transformers(path: Path, prompts: list[list[int]], out_tokens: int, batch: int = 8) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            chunk = prompts[i : i + batch]
            width = max(map(len, chunk))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            model.generate(ids, attention_mask=mask, max_new_tokens=out_tokens, min_new_tokens=out_tokens,
                           do_sample=False, pad_token_id=0)  # fmt: skip
    wall = time.perf_counter() - start
    gen = len(prompts) * out_tokens
    return {"wall_s": wall, "output_tok_s": gen / wall, "total_tok_s": (gen + sum(map(len, prompts))) / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--output-tokens", type=int, default=32)
    args = ap.parse_args()
    import torch  # after kubellm: its import sets CPU threading defaults torch must see

    path = builtin_model_path()
    engine = LLMEngine(EngineConfig(device="cpu"))
    prompts = make_prompts(engine, args.requests)
    ours = run_engine(engine, prompts, args.output_tokens)
    ref = run_transformers(path, prompts, args.output_tokens)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "benchmark": "engine_cpu",
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "hardware": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "workload": {
            "requests": args.requests,
            "prompt_tokens": "64-200 (seed 0)",
            "output_tokens": args.output_tokens,
            "model": "SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to float32",
        },
        "kubellm": ours,
        "transformers_generate_batch8": ref,
        "ratio_output_tok_s": ours["output_tok_s"] / ref["output_tok_s"],
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"engine-cpu-{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    table = [
        "| engine | wall s | output tok/s | total tok/s |",
        "|---|---|---|---|",
        f"| kubellm | {ours['wall_s']:.1f} | {ours['output_tok_s']:.1f} | {ours['total_tok_s']:.1f} |",
        f"| transformers generate, batch 8 | {ref['wall_s']:.1f} | {ref['output_tok_s']:.1f} "
        f"| {ref['total_tok_s']:.1f} |",
        f"| **ratio kubellm / transformers** | | **{result['ratio_output_tok_s']:.2f}x** | |",
    ]
    header = (f"# Engine CPU throughput, {result['date']} (commit {commit})\n\n"
              f"Hardware: {result['hardware']}. Workload: {result['workload']}.\n\n")  # fmt: skip
    stem.with_suffix(".md").write_text(header + "\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
