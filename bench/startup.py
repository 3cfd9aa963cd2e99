"""Start-up from a local safetensors directory: our engine, and vLLM beside it, loading the same files from disk.

    python -m bench.startup --shape llama-3.1-8b --dir /tmp/llama8b [--peer vllm] [--out-dir DIR]

Writes the shape's random bf16 weights once as a Hugging Face directory (config.json, model-0000i-of-0000n
.safetensors with HF tensor names, model.safetensors.index.json, and a word-level tokenizer.json our engine reads
and vLLM skips with skip_tokenizer_init), one shard at a time: the weights are drawn on the device and copied to
the host per tensor, so the host never holds more than a shard. A directory written earlier for the same config is
reused (write_s then says so). Then each engine starts in a fresh process (bench/startup_probe.py) per run:
  cold  the files' pages dropped from the page cache first (posix_fadvise DONTNEED on each file: no privilege
        needed, nothing else's cache dropped); the probe's read_bytes says how much came from storage, so a
        drop that did not take shows;
  warm  straight after, the files cached.
Reported per run: seconds from constructor to ready (weights, KV cache, CUDA graphs, ...), the seconds each engine
gives for its weights (ours: ModelRunner.weights_load_seconds; vLLM: its "Loading weights took" log line), GB/s
over those, peak host memory grown during start-up, bytes read. A ratio ours/vLLM is printed only for runs of
the same kind in this run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from bench.gpu_info import gpu_identity
from bench.result_files import git_commit, host_info, record
from bench.shapes import shape
from kubellm.engine.loader.hf_dir import INDEX_FILE
from kubellm.engine.model_config import ModelConfig
from kubellm.engine.random_model import synthetic_tokenizer_info, weight_shapes

log = logging.getLogger("bench.startup")
MARKER = "bench-startup.json"  # the config a finished write was made from; written last
RUN_KINDS = ("cold", "warm")


def checkpoint_config(shape_name: str | None, config_file: str | None, layers: int | None) -> dict[str, Any]:
    """The HF config.json the checkpoint is written for: a bench/shapes.py shape or a given file, layers cut
    to `layers` where asked (to fit a smaller checkpoint in one GPU call)."""
    cfg = dict(json.loads(Path(config_file).read_text()) if config_file else shape(shape_name or "llama-3.1-8b"))
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    return cfg


def plan_shards(shapes: dict[str, tuple[int, ...]], itemsize: int, shard_bytes: int) -> list[list[str]]:
    """Tensor names in checkpoint order, grouped into shards of at most `shard_bytes` (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, dims in shapes.items():
        n = itemsize
        for d in dims:
            n *= d
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def write_checkpoint(cfg: dict[str, Any], root: Path, device: str, shard_bytes: int, seed: int = 0) -> dict[str, Any]:
    """The directory for `cfg`, written unless a finished one for the same config is there already."""
    marker = root / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == cfg:
        return {"reused": True, "write_s": None, "bytes": checkpoint_bytes(root)}
    root.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    for old in root.glob("*.safetensors"):
        old.unlink()
    started = time.perf_counter()
    model = ModelConfig.from_hf_config(cfg)
    shapes = weight_shapes(model)
    dtype = torch.bfloat16
    shards = plan_shards(shapes, dtype.itemsize, shard_bytes)
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            t = torch.empty(shapes[name], dtype=dtype, device=device)
            if name.endswith("norm.weight"):
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.02, generator=gen)
            tensors[name] = t.cpu()
            weight_map[name] = file
            total += t.numel() * t.element_size()
        save_file(tensors, str(root / file), metadata={"format": "pt"})
        del tensors
        fd = os.open(root / file, os.O_RDONLY)
        try:
            os.fsync(fd)  # on storage before the clock stops, and clean: a cold run's cache drop can then take it
        finally:
            os.close(fd)
    (root / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (root / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (root / "tokenizer.json").write_text(synthetic_tokenizer_info(model.vocab_size).tokenizer_json)
    write_s = time.perf_counter() - started
    marker.write_text(json.dumps(cfg))
    return {"reused": False, "write_s": write_s, "bytes": checkpoint_bytes(root), "shards": len(shards)}


def checkpoint_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.glob("*.safetensors"))


def drop_page_cache(root: Path) -> str:
    """Drop the checkpoint's pages from the page cache, and only them (posix_fadvise DONTNEED per file: no
    privilege needed, and other processes' cache stays); the probe's read_bytes shows whether it took."""
    for p in root.glob("*.safetensors"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise_dontneed"


def run_probe(engine: str, root: Path, device: str, python: str, env: dict[str, str], timeout_s: float) -> dict:
    """bench/startup_probe.py in a fresh process: its JSON line, or {"error": why}."""
    cmd = [python, "-m", "bench.startup_probe", "--engine", engine, "--dir", str(root), "--device", device]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        return {"engine": engine, "error": f"did not start within {timeout_s:.0f} s"}
    sys.stderr.write(done.stderr[-4000:])
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"engine": engine, "error": f"exit {done.returncode}: {done.stderr.strip()[-1500:]}"}
    return json.loads(lines[-1])


def ratios(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """ours / vLLM for each run kind both engines completed in this run (lower is better)."""
    out: dict[str, dict[str, float]] = {}
    for kind in RUN_KINDS:
        ours = next((r for r in runs if r["engine"] == "ours" and r["kind"] == kind and "error" not in r), None)
        peer = next((r for r in runs if r["engine"] == "vllm" and r["kind"] == kind and "error" not in r), None)
        if ours and peer:
            out[kind] = {"ready_s": ours["ready_s"] / peer["ready_s"]}
            if ours.get("weights_s") and peer.get("weights_s"):
                out[kind]["weights_s"] = ours["weights_s"] / peer["weights_s"]
    return out


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def to_markdown(summary: dict[str, Any], host: dict[str, Any]) -> str:
    gpus = summary.get("gpu_identity", {}).get("gpus") or [{"name": "no GPU"}]
    w = summary["write"]
    written = "reused from an earlier write" if w["reused"] else f"written in {w['write_s']:.1f} s"
    lines = [
        f"# Start-up from local safetensors: {summary['model']}",
        "",
        f"{host['when']}, {gpus[0].get('name')} ({summary['device']}), commit {summary['commit']}.",
        f"Command: `{host['command']}`.",
        f"Checkpoint: {w['bytes'] / 1e9:.2f} GB of random bf16 safetensors ({written}); "
        "cold runs after dropping its pages from the page cache, warm runs straight after (files cached).",
        "",
        "| engine | run | cache drop | ready s | weights s | weights GB/s | read from storage GB "
        "| host peak grown GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["runs"]:
        if "error" in r:
            why = r["error"].strip().splitlines()[-1][:300]
            lines.append(f"| {r['engine']} | {r['kind']} | {r.get('cache_drop') or '-'} | error: {why} |")
            continue
        io = r.get("io") or {}
        lines.append(
            f"| {r['engine']} | {r['kind']} | {r.get('cache_drop') or '-'} | {r['ready_s']:.1f} "
            f"| {_fmt(r.get('weights_s'), '.2f')} | {_fmt(r.get('weights_gb_s'), '.2f')} "
            f"| {_fmt(io.get('read_bytes', 0) / 1e9 if io else None, '.2f')} | {r['host_peak_grown'] / 1e9:.2f} |"
        )
    for kind, ratio in summary["ratios"].items():
        parts = ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items())
        lines.append(f"\nours / vLLM ({kind}, same machine, same run): {parts}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3.1-8b", help="a model shape of bench/shapes.py")
    p.add_argument("--config", help="a config.json to write instead of --shape (the CPU test's tiny model)")
    p.add_argument("--layers", type=int, help="cut the shape to this many layers (a smaller checkpoint)")
    p.add_argument("--dir", required=True, help="where the checkpoint is written (reused when already there)")
    p.add_argument("--device", default="cuda", help="where the weights are drawn and both engines load them")
    p.add_argument("--shard-gb", type=float, default=5.0, help="shard size, as Hugging Face writes 8B models")
    p.add_argument("--runs", default="cold,warm", help="the runs of each engine, in order")
    p.add_argument("--peer", choices=("vllm",), help="measure vLLM too (its own process, after ours, each kind)")
    p.add_argument("--vllm-site", default=os.environ.get("VSITE", "/tmp/vsite"))
    p.add_argument("--deadline-s", type=float, default=540.0, help="no run is started past this many seconds")
    p.add_argument("--out-dir", help="results directory (default bench/results)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    started = time.perf_counter()
    now = datetime.now(UTC)
    cfg = checkpoint_config(None if args.config else args.shape, args.config, args.layers)
    model = Path(args.config).stem if args.config else args.shape
    model += f"-{cfg['num_hidden_layers']}l" if args.layers is not None else ""
    root = Path(args.dir)
    write = write_checkpoint(cfg, root, args.device, int(args.shard_gb * 1e9))
    log.info("checkpoint %s: %s", root, write)
    here = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    ours_env = dict(os.environ, PYTHONPATH=f"{path}:{here}" if path else here)
    peer_env = dict(os.environ, PYTHONPATH=f"{args.vllm_site}:{here}", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    # kind by kind, ours then vLLM: when the deadline cuts the run short, the runs done still pair up
    engines = [("ours", ours_env)] + ([("vllm", peer_env)] if args.peer else [])
    plan = [(engine, kind, env) for kind in args.runs.split(",") if kind for engine, env in engines]
    runs: list[dict[str, Any]] = []
    for engine, kind, env in plan:
        if kind not in RUN_KINDS:
            raise SystemExit(f"unknown run kind {kind!r}; choose from {', '.join(RUN_KINDS)}")
        left = args.deadline_s - (time.perf_counter() - started)
        if left < 30:
            runs.append({"engine": engine, "kind": kind, "error": f"skipped: {left:.0f} s left of the deadline"})
            continue
        drop = drop_page_cache(root) if kind == "cold" else None
        result = run_probe(engine, root, args.device, sys.executable, env, left)
        runs.append({"kind": kind, "cache_drop": drop, **result})
        log.info("%s %s: %s", engine, kind, runs[-1])
    summary = {
        "model": model,
        "config": cfg,
        "device": args.device,
        "commit": git_commit(),
        "gpu_identity": gpu_identity() if args.device == "cuda" else {},
        "write": write,
        "runs": runs,
        "ratios": ratios(runs),
    }
    host = host_info("-m bench.startup", argv, now, torch=torch.__version__)
    out_dir = Path(args.out_dir) if args.out_dir else Path(__file__).resolve().parent / "results"
    print(record(f"startup-{args.device}-{model}", summary, host, to_markdown, None, True, now, out_dir))
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
