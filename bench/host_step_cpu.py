"""Host time per engine step, decode-heavy: what the engine does around the model each step.

Workload ((b)-style, decode-heavy): the embedded SmolLM2-135M's tokenizer and config, 32 requests submitted
at once, 200-token prompts (word list, seed 0), greedy, ignore_eos, 1000 output tokens each, streamed: every
step returns the outputs of every request that got a token, and each output goes through what the server's
engine thread does with it (the copy `_snapshot_output` made while outputs were cumulative; nothing once they
are deltas).

`--device sim` (default): the engine's own scheduler, KV cache manager, detokenizer and output building run
for real, the model's forward is the simulated runner (a sleep, scaled down by --sim-time-scale, producing
the tokens of a placeholder text); `--device cpu`: the real model on the CPU (the forward then dominates the
wall time: on a small shared machine use fewer --output-tokens). Per decode step (all requests decoding,
none prefilling) it measures the step's wall time and the time in the model's forward and the sampler; host
time = wall - those, also as the engine thread's CPU time (time.thread_time: what a busy shared machine's
preemption does not inflate). Mean and p50 over all decode steps, p50 over the first and the last tenth of
them (where cumulative outputs were longest).

    python -m bench.host_step_cpu --label before|after [--device sim|cpu] [--output-tokens 1000]

Writes bench/results/host-step-<device>-<date>-<label>.json; once both labels exist for the date, also
bench/results/host-step-<device>-<date>.md comparing them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubellm.engine.config import EngineConfig
from kubellm.engine.llm_engine import LLMEngine
from kubellm.engine.sampling_params import SamplingParams

WORDS = ["river", "stone", "light", "quiet", "market", "engine", "garden", "history", "number", "silver", "paper"]
RESULTS = Path(__file__).parent / "results"


class _DeviceTimer:
    """Sums the wall time and this thread's CPU time spent inside wrapped callables (the model's forward and
    the sampler)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.cpu_seconds = 0.0

    def wrap(self, obj: Any, attr: str) -> None:
        orig = getattr(obj, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t, c = time.perf_counter(), time.thread_time()
            try:
                return orig(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t
                self.cpu_seconds += time.thread_time() - c

        setattr(obj, attr, timed)


def _server_copy() -> Callable[[Any], Any] | None:
    """The per-output copy the server's engine thread makes, where the code still has one."""
    from kubellm.engine.server import async_engine

    return getattr(async_engine, "_snapshot_output", None)


def run(requests: int, prompt_tokens: int, output_tokens: int, seed: int, device: str, scale: float) -> dict[str, Any]:
    from kubellm.engine import sampler as sampler_mod

    blocks = requests * (-(-(prompt_tokens + output_tokens) // 16) + 1)  # every request fits: no preemption
    config = EngineConfig(
        device=device, max_num_seqs=requests, num_gpu_blocks_override=blocks, sim_time_scale=scale
    )  # fmt: skip
    engine = LLMEngine(config)
    rng = random.Random(seed)
    prompts = []
    for _ in range(requests):
        ids = engine.renderer.encode(" ".join(rng.choice(WORDS) for _ in range(prompt_tokens)))
        prompts.append(ids[:prompt_tokens])
    timer = _DeviceTimer()
    # the model's forward: `logits` since the runner became a StepRunner (whose `execute` also samples),
    # `execute` before
    timer.wrap(engine.runner, "logits" if hasattr(engine.runner, "logits") else "execute")
    timer.wrap(engine.sampler, "sample")
    orig_result = sampler_mod.PendingSample.result

    def timed_result(self: Any) -> Any:
        t, c = time.perf_counter(), time.thread_time()
        try:
            return orig_result(self)
        finally:
            timer.seconds += time.perf_counter() - t
            timer.cpu_seconds += time.thread_time() - c

    sampler_mod.PendingSample.result = timed_result  # type: ignore[method-assign]
    server_copy = _server_copy()
    params = SamplingParams(temperature=0.0, max_tokens=output_tokens, ignore_eos=True)
    for p in prompts:
        engine.add_request(None, p, params)
    host_ms: list[float] = []
    host_cpu_ms: list[float] = []
    device_ms: list[float] = []
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        decoding = engine.scheduler.num_running == requests and all(
            r.num_computed_tokens >= r.num_prompt_tokens for r in engine.scheduler.running
        )
        timer.seconds = timer.cpu_seconds = 0.0
        t, c = time.perf_counter(), time.thread_time()
        outs = engine.step()
        if server_copy is not None:
            outs = [server_copy(o) for o in outs]
        wall, cpu = time.perf_counter() - t, time.thread_time() - c
        if decoding and len(outs) == requests:
            host_ms.append((wall - timer.seconds) * 1e3)
            host_cpu_ms.append((cpu - timer.cpu_seconds) * 1e3)
            device_ms.append(timer.seconds * 1e3)
    total = time.perf_counter() - start
    sampler_mod.PendingSample.result = orig_result  # type: ignore[method-assign]
    tenth = max(1, len(host_ms) // 10)
    return {
        "decode_steps": len(host_ms),
        "host_cpu_ms_mean": statistics.fmean(host_cpu_ms),
        "host_cpu_ms_p50": statistics.median(host_cpu_ms),
        "host_cpu_ms_first_tenth_p50": statistics.median(host_cpu_ms[:tenth]),
        "host_cpu_ms_last_tenth_p50": statistics.median(host_cpu_ms[-tenth:]),
        "host_ms_mean": statistics.fmean(host_ms),
        "host_ms_p50": statistics.median(host_ms),
        "host_ms_last_tenth_p50": statistics.median(host_ms[-tenth:]),
        "device_ms_mean": statistics.fmean(device_ms),
        "wall_s": total,
        "server_copy": server_copy is not None,
    }


def _markdown(date: str, before: dict[str, Any], after: dict[str, Any]) -> str:
    device = after["workload"]["device"]
    rows = [
        ("host CPU ms/step (engine thread), mean", "host_cpu_ms_mean"),
        ("host CPU ms/step, p50", "host_cpu_ms_p50"),
        ("host CPU ms/step, p50 of the first tenth of decode steps", "host_cpu_ms_first_tenth_p50"),
        ("host CPU ms/step, p50 of the last tenth (longest outputs)", "host_cpu_ms_last_tenth_p50"),
        ("host wall ms/step, mean", "host_ms_mean"),
        ("host wall ms/step, p50", "host_ms_p50"),
        ("host wall ms/step, p50 of the last tenth", "host_ms_last_tenth_p50"),
        ("model (+ sampler) ms/step, mean", "device_ms_mean"),
    ]
    lines = [
        f"# Host time per decode step ({device} runner), before/after delta outputs ({date})",
        "",
        f"Hardware: {after['hardware']}. Workload: {after['workload']}.",
        f"Commands: before (commit {before['commit']}): `{before['command']}`; "
        f"after (commit {after['commit']}): `{after['command']}`.",
        "",
        "| per decode step | before (cumulative outputs) | after (delta outputs) | after / before |",
        "|---|---|---|---|",
    ]
    for label, key in rows:
        b, a = before["result"][key], after["result"][key]
        lines.append(f"| {label} | {b:.2f} | {a:.2f} | {a / b:.2f}x |")
    lines.append(
        f"| decode steps measured | {before['result']['decode_steps']} | {after['result']['decode_steps']} | |"
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", required=True, choices=["before", "after"])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--output-tokens", type=int, default=1000)
    ap.add_argument("--device", choices=["sim", "cpu"], default="sim")
    ap.add_argument("--sim-time-scale", type=float, default=0.01, help="sim: scale of the simulated step times")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import torch  # after kubellm: its import sets CPU threading defaults torch must see

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = run(args.requests, args.prompt_tokens, args.output_tokens, args.seed, args.device, args.sim_time_scale)
    date = datetime.date.today().isoformat()
    record = {
        "benchmark": "host_step_cpu",
        "label": args.label,
        "date": date,
        "commit": commit,
        "command": "python -m bench.host_step_cpu " + " ".join(sys.argv[1:]),
        "hardware": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "note": "2-core machine shared with other jobs: wall figures are noisy, compare within one file pair",
        },
        "workload": {
            "model": "SmolLM2-135M-Instruct Q4_1 GGUF (tokenizer and config; weights too with --device cpu)",
            "device": args.device,
            "sim_time_scale": args.sim_time_scale if args.device == "sim" else None,
            "requests": args.requests,
            "prompt_tokens": args.prompt_tokens,
            "output_tokens": args.output_tokens,
            "sampling": "greedy, ignore_eos, streamed (outputs every step)",
            "seed": args.seed,
        },
        "result": result,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = f"host-step-{args.device}-{date}"
    (RESULTS / f"{stem}-{args.label}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    other = RESULTS / f"{stem}-{'after' if args.label == 'before' else 'before'}.json"
    if other.exists():
        pair = {args.label: record, ("after" if args.label == "before" else "before"): json.loads(other.read_text())}
        md = _markdown(date, pair["before"], pair["after"])
        (RESULTS / f"{stem}.md").write_text(md)
        print(md)


if __name__ == "__main__":
    main()
