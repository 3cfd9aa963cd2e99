"""The soak and fuzz benchmarks record their results one way (bench/result_files.py): the summary JSON with
the host it ran on, and a markdown report under bench/results/<name>-<date>; they start both as scripts and
as modules."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_result_files():
    # By path: `pytest` does not put the repository root (and so the `bench` package) on sys.path.
    spec = importlib.util.spec_from_file_location("bench_result_files", REPO / "bench" / "result_files.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


result_files = _load_result_files()
host_info, record = result_files.host_info, result_files.record
NOW = datetime(2026, 11, 28, 20, 24, tzinfo=UTC)


def report(summary: dict, host: dict) -> str:
    return f"# {summary['name']} on {host['cpus']} CPUs\n"


def test_host_names_the_hardware_versions_time_and_exact_command():
    host = host_info("bench/fuzz.py", ["--requests", "10"], NOW, schemathesis="4.0")
    assert list(host) == ["cpus", "machine", "python", "schemathesis", "when", "command"]
    assert host["when"] == "2026-11-28 20:24 UTC"
    assert host["command"] == "python bench/fuzz.py --requests 10"
    assert isinstance(host["cpus"], int) and host["machine"] and host["python"].count(".") == 2


def test_json_out_gets_the_summary_with_its_host_and_the_markdown_is_returned(tmp_path):
    host = host_info("bench/soak.py", [], NOW)
    out = tmp_path / "soak.json"
    md = record("soak", {"name": "soak"}, host, report, str(out), False, NOW, results_dir=tmp_path / "results")
    assert md == report({"name": "soak"}, host)
    assert json.loads(out.read_text()) == {"name": "soak", "host": json.loads(json.dumps(host))}
    assert not (tmp_path / "results").exists()  # published results only when asked for


def test_write_results_publishes_json_and_markdown_named_by_date(tmp_path):
    host = host_info("bench/fuzz.py", ["--write-results"], NOW)
    md = record("fuzz", {"name": "fuzz"}, host, report, None, True, NOW, results_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fuzz-2026-11-28.json", "fuzz-2026-11-28.md"]
    assert (tmp_path / "fuzz-2026-11-28.md").read_text() == md
    assert json.loads((tmp_path / "fuzz-2026-11-28.json").read_text())["host"]["command"] == host["command"]


@pytest.mark.parametrize("name", ["soak", "fuzz"])
@pytest.mark.parametrize("as_module", [False, True])
def test_benchmarks_start_as_script_and_as_module(name, as_module):
    target = ["-m", f"bench.{name}"] if as_module else [str(REPO / "bench" / f"{name}.py")]
    proc = subprocess.run([sys.executable, *target, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--write-results" in proc.stdout
