"""The offline benchmark's tables: our engine beside the peer measured in the same run, and both against bounds
computed from the same run's ceilings. Pure bookkeeping over the results dict (no torch), tested on a CPU machine.

A figure that was not measured in this run prints "not measured" (with the reason where there is one), never a
number from another run, and no ratio is printed against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NOT_MEASURED = "not measured"


@dataclass(frozen=True)
class Row:
    name: str
    ours: float | None
    peer: float | None
    bound: float | None
    lower_is_better: bool = False


def speed_ratio(x: float | None, y: float | None, lower_is_better: bool = False) -> float | None:
    """x's speed over y's (> 1: x is faster), for throughputs and for times alike; None where either is missing."""
    if x is None or y is None or x != x or y != y or x <= 0 or y <= 0:
        return None
    return y / x if lower_is_better else x / y


def fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return NOT_MEASURED
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.2f}"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    return str(x)


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def peer_figures(r: dict[str, Any]) -> dict[str, Any]:
    """The peer's results if it ran in this run on this GPU, else {} (the reason is in r['peer']['error'])."""
    peer = r.get("peer") or {}
    return {} if peer.get("error") else peer


def comparison_rows(r: dict[str, Any]) -> list[Row]:
    ours_w, peer = r.get("workloads", {}), peer_figures(r)
    peer_w, b, startup = peer.get("workloads", {}), r.get("bounds", {}), r.get("startup", {})

    def w(src: dict[str, Any], key: str, field: str) -> float | None:
        return src.get(key, {}).get(field)

    return [
        Row("(a) total tok/s", w(ours_w, "a", "total_tok_s"), w(peer_w, "a", "total_tok_s"), b.get("a_total_tok_s")),
        Row(
            "(b) output tok/s", w(ours_w, "b", "output_tok_s"), w(peer_w, "b", "output_tok_s"), b.get("b_output_tok_s")
        ),
        Row(
            "(c) output tok/s, prefix cache on", w(ours_w, "c_on", "output_tok_s"), w(peer_w, "c", "output_tok_s"), None
        ),
        Row("(c) output tok/s, prefix cache off", w(ours_w, "c_off", "output_tok_s"), None, None),
        Row(
            "batch-1 decode ms/token",
            (r.get("batch1") or {}).get("ms_per_token"),
            (peer.get("batch1") or {}).get("ms_per_token"),
            b.get("batch1_ms"),
            lower_is_better=True,
        ),
        Row("start-up s (constructor to ready)", startup.get("engine_init_s"), peer.get("startup_s"), None, True),
        Row("KV capacity, tokens", startup.get("kv_tokens"), peer.get("kv_tokens"), None),
        Row("KV bytes per token", startup.get("kv_bytes_per_token"), peer.get("kv_bytes_per_token"), None, True),
        Row("(a) preemptions", w(ours_w, "a", "preemptions"), w(peer_w, "a", "preemptions"), None, True),
        Row("(b) preemptions", w(ours_w, "b", "preemptions"), w(peer_w, "b", "preemptions"), None, True),
    ]


def comparison_table(r: dict[str, Any]) -> str:
    peer = r.get("peer") or {}
    peer_name = f"vLLM {peer['version']}" if peer.get("version") else "peer"
    lines = [
        f"| figure | ours | {peer_name} | ours/peer | bound | ours/bound | peer/bound |",
        "|---|---|---|---|---|---|---|",
    ]
    counts = {"KV capacity, tokens", "KV bytes per token", "(a) preemptions", "(b) preemptions"}
    for row in comparison_rows(r):
        if row.name in counts:  # counts, not speeds: no ratios
            lines.append(f"| {row.name} | {fmt(row.ours)} | {fmt(row.peer)} | - | - | - | - |")
            continue
        lower = row.lower_is_better
        lines.append(
            f"| {row.name} | {fmt(row.ours)} | {fmt(row.peer)} | {fmt_ratio(speed_ratio(row.ours, row.peer, lower))} "
            f"| {'-' if row.bound is None else fmt(row.bound)} | {fmt_ratio(speed_ratio(row.ours, row.bound, lower))} "
            f"| {fmt_ratio(speed_ratio(row.peer, row.bound, lower))} |"
        )
    lines += ["", "Ratios are speed ratios (> 1: the first is faster), also for the ms and s rows."]
    if peer.get("error"):
        lines.append(f"The peer: {NOT_MEASURED} in this run ({peer['error']}).")
    for note in r.get("bound_notes", []):
        lines.append(note)
    return "\n".join(lines)


def workload_table(r: dict[str, Any]) -> str:
    lines = [
        "| workload (ours) | req/s | output tok/s | total tok/s | TTFT p50/p99 s | TPOT p50/p99 ms | preemptions "
        "| peak alloc GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, x in r.get("workloads", {}).items():
        lines.append(
            f"| {key} ({x['requests']} req) | {x['requests_per_s']:.2f} | {x['output_tok_s']:,.0f} | "
            f"{x['total_tok_s']:,.0f} | {x['ttft_p50_s']:.2f} / {x['ttft_p99_s']:.2f} | "
            f"{x['tpot_p50_ms']:.1f} / {x['tpot_p99_ms']:.1f} | {x['preemptions']} | {x['peak_allocated_gib']:.1f} |"
        )
    return "\n".join(lines)


def decode_table(r: dict[str, Any]) -> str:
    d = r.get("decode") or {}
    if not d:
        return ""
    lines = [
        "| decode batch (ours) | engine step ms | same, synchronous steps | forward alone ms (synchronised) "
        "| roofline ms (GEMM + attention) | step/roofline |",
        "|---|---|---|---|---|---|",
    ]
    for b, x in d.items():
        lines.append(
            f"| {b} | {x['step_ms']:.2f} | {x.get('sync_step_ms', float('nan')):.2f} | {x['forward_ms']:.2f} "
            f"| {x['roofline_ms']:.2f} ({x['roofline_gemm_ms']:.2f} + {x['roofline_attention_ms']:.2f}) | "
            f"{x['step_ms'] / x['roofline_ms']:.2f} |"
        )
    return "\n".join(lines)


def table(r: dict[str, Any]) -> str:
    parts = [comparison_table(r), workload_table(r), decode_table(r)]
    return "\n\n".join(p for p in parts if p)


def same_machine(ours: dict[str, Any], peer: dict[str, Any]) -> str | None:
    """None when both results name the same GPUs (by UUID); else why they cannot be compared."""
    a = [g.get("uuid") for g in ours.get("gpus", [])]
    b = [g.get("uuid") for g in peer.get("gpus", [])]
    if not a or not b:
        return "a GPU identity is missing"
    if a != b:
        return f"the peer ran on other GPUs ({', '.join(map(str, b))}) than ours ({', '.join(map(str, a))})"
    return None


def settings_mismatch(ours: dict[str, Any], peer: dict[str, Any]) -> list[str]:
    """Settings that differ between the two runs (engine limits, sampling, shape, scale): each one voids the ratio."""
    out = []
    for key in ("shape", "scale", "settings", "sampling"):
        if ours.get(key) != peer.get(key):
            out.append(f"{key}: ours {ours.get(key)!r}, peer {peer.get(key)!r}")
    return out
