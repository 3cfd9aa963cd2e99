"""`kubellm up` (what `make up` runs) answers a chat completion on the embedded model, then Ctrl-C stops it all."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import openai
from server_harness import free_port_run


def _start_up(*args: str) -> tuple[subprocess.Popen, str]:
    port = free_port_run(4)  # the front port and the engines' next ones (up to --replicas 3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubellm.cli", "up", "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    deadline = time.monotonic() + 400
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"OpenAI base URL: (\S+)", line)
        if m:
            return proc, m.group(1)
        assert time.monotonic() < deadline, "".join(lines[-40:])
    raise AssertionError("kubellm up exited before printing the base URL:\n" + "".join(lines[-60:]))


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    try:
        out, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError("kubellm up did not stop on Ctrl-C:\n" + out[-3000:]) from None
    assert "stopped" in out, out[-3000:]
    return proc.returncode


def test_up_answers_a_chat_completion_and_stops_cleanly():
    proc, base_url = _start_up("--device", "cpu")
    try:
        client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=2, timeout=120)
        out = client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=12,
            temperature=0,
        )
        assert "Paris" in out.choices[0].message.content
    finally:
        code = _stop(proc)
    assert code == 0


def test_up_rejects_replicas_without_router():
    out = subprocess.run(
        [sys.executable, "-m", "kubellm.cli", "up", "--replicas", "2", "--no-router"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "router" in out.stderr
