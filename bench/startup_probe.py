"""One engine's start-up from a safetensors directory, measured in a fresh process (bench/startup.py starts it).

Prints one JSON line: seconds to import the engine (apart), seconds from its constructor to ready, the seconds
the engine itself reports for its weights, peak host memory (VmHWM, and the resident set sampled every few ms in
a thread) above what the process held before the constructor, and the bytes the process read (/proc/self/io:
`read_bytes` from storage, zero when the page cache held the files; `read_chars` through read syscalls, which an
mmap'ed load does not count).

Stdlib only at import: the vLLM side runs with vLLM's own packages (PYTHONPATH=/tmp/vsite).

    python -m bench.startup_probe --engine ours|vllm --dir DIR [--device cuda] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

from bench.workloads import EngineSettings

# What vLLM logs about its weights: "Loading weights took 3.21 seconds", "Model loading took 14.96 GiB memory and
# 3.6 seconds" (the wording of vLLM 0.26's default loader and GPU model runner).
_VLLM_LOAD_LINE = re.compile(r"(Loading weights|Model loading) took .*?([\d.]+) seconds")


def vm_status(key: str) -> int:
    """Bytes of /proc/self/status's `key` (VmRSS: resident now, VmHWM: this process image's peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


class RssSampler(threading.Thread):
    """The largest resident set seen, sampled every `interval` seconds until stopped."""

    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval, self.peak = interval, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, vm_status("VmRSS"))
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


def io_counters() -> dict[str, int] | None:
    """/proc/self/io's read_bytes (fetched from storage) and rchar (through read syscalls); None if unreadable."""
    try:
        with open("/proc/self/io") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return {"read_bytes": int(fields["read_bytes"]), "read_chars": int(fields["rchar"])}
    except (OSError, KeyError, ValueError):
        return None


def start_ours(model_dir: str, device: str, dtype: str, settings: EngineSettings) -> tuple[Any, float | None]:
    from kubellm.engine import LLM

    # the CPU run (a test of the bench) gets a small KV pool, so its host memory is the weights' and little else
    cpu = device == "cpu"
    llm = LLM(
        model=model_dir, device=device, dtype=dtype, max_model_len=256 if cpu else settings.max_model_len,
        num_gpu_blocks_override=16 if cpu else None,
        max_num_seqs=settings.max_num_seqs, max_num_batched_tokens=settings.max_num_batched_tokens,
        gpu_memory_utilization=settings.gpu_memory_utilization, block_size=settings.block_size,
        enable_prefix_caching=settings.enable_prefix_caching, seed=settings.seed,
    )  # fmt: skip
    return llm, getattr(llm.engine.runner, "weights_load_seconds", None)  # TP runners: not measured


def start_vllm(model_dir: str, device: str, dtype: str, settings: EngineSettings) -> tuple[Any, float | None]:
    from vllm import LLM

    lines: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logging.getLogger("vllm").addHandler(Grab())
    llm = LLM(
        model=model_dir, load_format="safetensors", skip_tokenizer_init=True, dtype=dtype,
        max_model_len=settings.max_model_len, max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        gpu_memory_utilization=settings.gpu_memory_utilization, block_size=settings.block_size,
        enable_prefix_caching=settings.enable_prefix_caching, seed=settings.seed,
    )  # fmt: skip
    return llm, vllm_weights_seconds(lines)


def vllm_weights_seconds(log_lines: list[str]) -> float | None:
    """The seconds vLLM's loader gives for its weights ("Loading weights took"), else its model runner's
    ("Model loading took ... and N seconds", which adds building the model); None when it logged neither."""
    found = [m for m in (_VLLM_LOAD_LINE.search(line) for line in log_lines) if m]
    weights = next((float(m.group(2)) for m in found if m.group(1) == "Loading weights"), None)
    return float(found[0].group(2)) if weights is None and found else weights


def first_token(engine_name: str, llm: Any) -> list[int]:
    """One greedy token from a 3-token prompt: the engine serves, not only constructs."""
    if engine_name == "vllm":
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)  # no tokenizer was loaded
    else:
        from kubellm.engine import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0)
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], params)
    return list(out[0].outputs[0].token_ids)


def measure(engine_name: str, model_dir: str, device: str, dtype: str) -> dict[str, Any]:
    settings = EngineSettings()
    start = start_vllm if engine_name == "vllm" else start_ours
    t = time.perf_counter()
    importlib.import_module("vllm" if engine_name == "vllm" else "kubellm.engine.llm")  # not counted as loading
    import_s = time.perf_counter() - t
    before_rss, io_before = vm_status("VmRSS"), io_counters()
    sampler = RssSampler()
    sampler.start()
    t = time.perf_counter()
    engine, weights_s = start(model_dir, device, dtype, settings)
    ready_s = time.perf_counter() - t
    sampled_peak = sampler.stop()
    io_after, peak = io_counters(), vm_status("VmHWM")
    checkpoint = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
    token = first_token(engine_name, engine)
    io = None if io_before is None or io_after is None else {k: io_after[k] - io_before[k] for k in io_before}
    return {
        "engine": engine_name,
        "import_s": import_s,
        "ready_s": ready_s,
        "weights_s": weights_s,
        "checkpoint_bytes": checkpoint,
        "weights_gb_s": checkpoint / weights_s / 1e9 if weights_s else None,
        "host_rss_before": before_rss,
        "host_peak_grown": peak - before_rss,
        "host_peak_sampled_grown": sampled_peak - before_rss,
        "io": io,
        "first_token": token,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", choices=("ours", "vllm"), required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)
    print(json.dumps(measure(args.engine, args.dir, args.device, args.dtype)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
