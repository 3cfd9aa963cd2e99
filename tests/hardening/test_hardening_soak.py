"""CI soak: 90 s of Poisson load on 3 sim replicas + router, with SIGKILL, SIGTERM and a router restart.

Runs bench/soak.py as a child process (bounded by duration, request budget and a hang timeout) and holds it
to the zero-counts of the [hardening] issue.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_soak_90s_with_replica_kills_and_router_restart(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "soak.py"),
        "--duration",
        "90",
        "--rate",
        "10",
        "--fault-interval",
        "12",
        "--json-out",
        str(out),
        "--log-dir",
        str(tmp_path / "logs"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=280)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads(out.read_text())
    report = proc.stdout[-4000:]
    assert s["faults"]["SIGKILL"] >= 1 and s["faults"]["SIGTERM"] >= 1, report
    assert s["faults"]["router_restart"] == 1, report
    assert s["sent"] >= 500, report
    assert s["violations"] == {}, json.dumps(s["violation_examples"], indent=1)
    assert s["hung"] == 0
    assert s["failed_before_first_byte"]["lost"] == 0
    assert s["failed_mid_stream"]["cut_without_error_event"] == 0
    assert s["kv_blocks_held_total"] == 0 and None not in s["kv_blocks_held_after"].values(), report
    assert (
        s["succeeded"]
        + s["client_disconnects"]
        + s["failed_before_first_byte"]["answered_503_retry_after"]
        + s["failed_mid_stream"]["with_sse_error_event"]
        == s["sent"]
    ), report
    assert s["passed"] and proc.returncode == 0, report
