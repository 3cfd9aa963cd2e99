"""`kubellm up` (what `make up` runs) answers a chat completion on the embedded model, then Ctrl-C stops it all."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from server_harness import free_port_run

from kubellm import local_stack
from kubellm.local_stack import listens_on, port_in_use


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


def _children(pid: int) -> list[int]:
    """PIDs whose parent is `pid`, read from /proc (field 4 of /proc/PID/stat, after the command name)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for a reaper but holds no port)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGKILL], ids=["terminal-closed", "kill-9"])
def test_no_child_outlives_up(sig):
    """A second `kubellm up` whose engine port is the first one's engine port refuses before starting anything (it never
    answers through the first one's engine); closing the first one's terminal, or kill -9, leaves neither
    engine nor router running and its ports free."""
    proc, base_url = _start_up("--device", "sim")
    kids = _children(proc.pid)
    port = int(base_url.rsplit(":", 1)[1].split("/")[0])
    try:
        assert len(kids) == 2, f"expected an engine and a router under kubellm up, found {kids}"
        assert all(_running(k) for k in kids)
        second = subprocess.run(
            [sys.executable, "-m", "kubellm.cli", "up", "--device", "sim", "--no-router", "--port", str(port + 1)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert second.returncode == 2 and "is up" not in second.stdout
        assert f"port {port + 1} is in use (the OpenAI endpoint)" in second.stderr
        proc.send_signal(sig)
        deadline = time.monotonic() + 5.0
        while any(_running(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        survivors = [k for k in kids if _running(k)]
        assert not survivors, f"still running 5 s after {sig.name}: {survivors}"
        assert not port_in_use("127.0.0.1", port) and not port_in_use("127.0.0.1", port + 1)
    finally:
        for k in kids:  # never leave them behind for the next test, whatever happened
            if _running(k):
                os.kill(k, signal.SIGKILL)
        proc.kill()
        proc.communicate(timeout=30)


def test_make_up_on_an_occupied_port_is_one_line(tmp_path):
    """`make up PORT=N` where N is taken: exit non-zero with one line naming the port and the flag, and never
    'up' by answering through the other server."""
    repo = Path(__file__).resolve().parents[2]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # -o: the venv is already installed (CI runs inside it); BIN: this interpreter's scripts
        out = subprocess.run(
            ["make", "-s", "-C", str(repo), "-o", ".venv/.installed", "up", f"PORT={port}",
             f"BIN={Path(sys.executable).parent}", "UP_ARGS=--device sim"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert out.returncode != 0
    ours = [line for line in out.stderr.splitlines() if line.startswith("kubellm up:")]
    assert ours == [
        f"kubellm up: port {port} is in use (the router's OpenAI endpoint); is another `kubellm up` running? "
        "Choose other ports with --port N (make up PORT=N)"
    ], out.stderr
    assert "Traceback" not in out.stderr and "is up" not in out.stdout


@pytest.mark.parametrize("part", ["serve", "router"])
def test_server_on_a_port_in_use_says_so_in_one_line(part):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["--device", "sim"] if part == "serve" else ["--backend", "http://127.0.0.1:9"]
        out = subprocess.run(
            [sys.executable, "-m", "kubellm.cli", part, *argv, "--host", "127.0.0.1", "--port", str(port)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} (Address already in use); choose another port with --port" in out.stderr
    assert "Traceback" not in out.stderr


def test_listens_on_tells_our_listener_from_anothers():
    with socket.socket() as mine:
        mine.bind(("127.0.0.1", 0))
        mine.listen()
        port = mine.getsockname()[1]
        assert listens_on(os.getpid(), port) is True
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            assert listens_on(other.pid, port) is False
        finally:
            other.kill()
            other.wait()


def test_a_server_that_took_the_port_after_the_check_never_passes_for_ours(monkeypatch, capsys):
    """Two `kubellm up` started at the same moment both find the port free; the one whose engine lost the
    race must not report 'up' on the other's healthy answer."""
    import http.server
    import threading

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    other = http.server.HTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    port = other.server_address[1]
    monkeypatch.setattr(local_stack, "port_in_use", lambda host, p: False)  # the race: both checks passed
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        code = local_stack.main(["--device", "sim", "--no-router", "--port", str(port)])
    finally:
        other.shutdown()
        for s, h in handlers.items():
            signal.signal(s, h)
    err = capsys.readouterr()
    assert code == 1 and "is up" not in err.out
    assert f"port {port} answers, but not from our engine-0: another server took it" in err.err
