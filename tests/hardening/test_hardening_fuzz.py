"""CI fuzz: schemathesis drives 2,000 generated requests from each server's own /openapi.json against a
`kubellm serve --device sim` and a `kubellm router` in front of it (bench/fuzz.py): zero 5xx, zero hangs,
every 4xx in OpenAI's error shape, no tracebacks in the servers' logs, no KV block held afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_fuzz_2000_requests_per_server(tmp_path: Path) -> None:
    out = tmp_path / "fuzz.json"
    cmd = [sys.executable, str(REPO / "bench" / "fuzz.py"), "--requests", "2000", "--workers-per-server", "2",
           "--json-out", str(out), "--log-dir", str(tmp_path / "logs")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=380)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads(out.read_text())
    for name, server in s["servers"].items():
        assert server["requests"] >= 2000, (name, server["by_operation"])
        assert server["violations"] == {}, json.dumps(server["violation_examples"], indent=1)
        assert not [k for k in server["statuses"] if k.startswith("5")], (name, server["statuses"])
        assert server["statuses"].get("200", 0) > 100, (name, server["statuses"])  # the happy path is reached
    assert s["kv_blocks_held_after"] == 0
    assert s["tracebacks_in_logs"] == 0
    assert all(s["processes_alive_at_end"].values())
    assert s["passed"] and proc.returncode == 0, proc.stdout[-3000:]
