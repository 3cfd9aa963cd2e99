"""Which GPU machine a figure came from: name, UUID and driver from nvidia-smi (stdlib only, for both engines'
processes). Two result files are compared only when their GPU UUIDs match: the same card, the same run."""

from __future__ import annotations

import socket
import subprocess
from typing import Any


def gpu_identity() -> dict[str, Any]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,uuid,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": f"nvidia-smi: {e}", "host": socket.gethostname()}
    cards = [dict(zip(("name", "uuid", "driver", "memory"), (x.strip() for x in line.split(",")), strict=False))
             for line in out.strip().splitlines()]  # fmt: skip
    return {"host": socket.gethostname(), "gpus": cards}
