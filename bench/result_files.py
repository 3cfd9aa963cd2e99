"""Where a hardening benchmark's result goes: the host it ran on, the summary JSON (to --json-out and/or
bench/results/<name>-<date>.json) and its markdown report (bench/results/<name>-<date>.md).

Shared by bench/soak.py and bench/fuzz.py, which run both as `python bench/<name>.py` and as
`python -m bench.<name>`."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    """The commit measured: KUBELLM_GIT_COMMIT when set (a copied tree without .git), else git's HEAD."""
    if os.environ.get("KUBELLM_GIT_COMMIT"):
        return os.environ["KUBELLM_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def host_info(script: str, argv: Sequence[str] | None, now: datetime, **versions: str) -> dict[str, Any]:
    """The hardware, software and exact command behind a figure (argv None: this process's own arguments)."""
    args = sys.argv[1:] if argv is None else argv
    return {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        **versions,
        "when": now.strftime("%Y-%m-%d %H:%M UTC"),
        "command": f"python {script} " + " ".join(args),
    }


def record(
    name: str,
    summary: dict[str, Any],
    host: dict[str, Any],
    to_markdown: Callable[[dict[str, Any], dict[str, Any]], str],
    json_out: str | None,
    write_results: bool,
    now: datetime,
    results_dir: Path = RESULTS,
) -> str:
    """Stamp `summary` with `host`, write it where asked, and return the markdown report."""
    summary["host"] = host
    text = json.dumps(summary, indent=2, default=str)
    markdown = to_markdown(summary, host)
    if json_out:
        Path(json_out).write_text(text)
    if write_results:
        results_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{name}-{now.strftime('%Y-%m-%d')}"  # not Path.with_suffix: it would eat '.1-8b' of a name
        (results_dir / f"{stem}.json").write_text(text)
        (results_dir / f"{stem}.md").write_text(markdown)
    return markdown
