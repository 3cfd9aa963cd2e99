"""`kubellm up` (what `make up` runs): a local stack with no Kubernetes: N `kubellm serve` replicas on the
embedded model, plus `kubellm router` in front when the router is installed; prints the OpenAI base URL.

Children run in their own sessions, so Ctrl-C reaches only this process, which then stops them in order
(router first, so no request is routed to a stopping engine), each with SIGTERM and a grace period. SIGHUP (the
terminal closed) stops them the same way, and a child whose parent dies unannounced (kill -9) stops itself
(kubellm.parent_watch), so no server outlives `kubellm up` holding its ports. Every port is checked free before
anything starts, so a second `kubellm up` cannot mistake the first one's servers for its own.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from kubellm.builtin_models import DEFAULT_MODEL
from kubellm.parent_watch import PARENT_PID_ENV

READY_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 40.0


@dataclass
class Child:
    name: str
    url: str
    proc: subprocess.Popen


@dataclass
class Stack:
    children: list[Child] = field(default_factory=list)

    def stop(self) -> None:
        """Router first, then engines: SIGTERM, wait, then SIGKILL whatever is left."""
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
            try:
                child.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                say(f"kubellm up: {child.name} did not stop in {STOP_TIMEOUT_S:.0f}s; killing it")
                child.proc.kill()
                child.proc.wait()

    def dead(self) -> Child | None:
        return next((c for c in self.children if c.proc.poll() is not None), None)


def say(message: str) -> None:
    """Print to stderr; a closed terminal (SIGHUP) must not stop us from stopping the children."""
    try:
        print(message, file=sys.stderr, flush=True)
    except OSError:
        pass


def port_in_use(host: str, port: int) -> bool:
    """Whether binding host:port fails the way our servers would (they bind with SO_REUSEADDR too)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after the parenthesized name
                out.append(int(entry))
    return out


def listens_on(pid: int, port: int) -> bool | None:
    """Whether process `pid` (or one of its children: `kubellm router --workers N` listens in its workers) holds a
    listening TCP socket on `port`, read from Linux's /proc (socket inodes against the kernel's TCP tables); None
    where /proc cannot tell (another OS)."""
    try:
        os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    inodes = set()
    for p in [pid, *_children(pid)]:
        try:
            fds = os.listdir(f"/proc/{p}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{p}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()  # sl local_address rem_address st ... inode
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port and cols[9] in inodes:  # 0A: LISTEN
                return True
    return False


def planned_ports(front_host: str, front_port: int, replicas: int, use_router: bool) -> list[tuple[str, int, str]]:
    """(host, port, what listens there) for every server `kubellm up` starts."""
    if not use_router:
        return [(front_host, front_port, "the OpenAI endpoint")]
    engines = [("127.0.0.1", front_port + 1 + i, f"engine-{i}, at --port + {1 + i}") for i in range(replicas)]
    return [(front_host, front_port, "the router's OpenAI endpoint"), *engines]


def router_available() -> bool:
    try:
        return importlib.util.find_spec("kubellm.router.cli") is not None
    except ModuleNotFoundError:
        return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kubellm up",
        description="Start a local stack (engine replicas + router, no Kubernetes) and print the OpenAI base URL. "
        "Arguments after `--` go to every `kubellm serve`.",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"model for the engines (default {DEFAULT_MODEL})")
    p.add_argument("--replicas", type=int, default=1, help="engine replicas (more than one needs the router)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "sim"], help="engine device")
    p.add_argument("--host", default="127.0.0.1", help="bind address of the front server (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port of the OpenAI endpoint; engines use the next ones")
    p.add_argument("--served-model-name", default=None, help="model name clients use (default: MODEL)")
    p.add_argument(
        "--router",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="put the router in front (default: if installed)",
    )
    p.add_argument("--policy", default=None, help="router policy (prefix, least_load, round_robin, session)")
    return p


def _wait_healthy(stack: Stack, child: Child, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gone = stack.dead()
        if gone is not None:
            raise RuntimeError(f"{gone.name} exited with code {gone.proc.returncode} while starting")
        try:
            with urllib.request.urlopen(child.url + "/health", timeout=2) as r:
                if r.status == 200:
                    _check_own_listener(child)
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{child.name} was not healthy within {timeout:.0f}s")


def _check_own_listener(child: Child) -> None:
    """A healthy answer counts only from our own child: a server that took the port after the free-port check
    (another `kubellm up` started at the same moment) must not pass for it."""
    port = int(child.url.rsplit(":", 1)[1])
    if listens_on(child.proc.pid, port) is False:
        raise RuntimeError(
            f"port {port} answers, but not from our {child.name}: another server took it; "
            "choose other ports with --port N (make up PORT=N)"
        )


def _spawn(name: str, url: str, argv: list[str]) -> Child:
    cmd = [sys.executable, "-m", "kubellm.cli", *argv]
    env = {**os.environ, PARENT_PID_ENV: str(os.getpid())}  # the child stops itself if we die unannounced
    proc = subprocess.Popen(cmd, start_new_session=True, env=env)  # Ctrl-C reaches only us; we stop them in order
    return Child(name, url, proc)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    use_router = router_available() if args.router is None else args.router
    if args.router and not router_available():
        print("kubellm up: --router needs the router part (pip install 'kubellm[router]')", file=sys.stderr)
        return 2
    if args.replicas < 1:
        print("kubellm up: --replicas must be at least 1", file=sys.stderr)
        return 2
    if args.replicas > 1 and not use_router:
        print("kubellm up: more than one replica needs the router in front", file=sys.stderr)
        return 2
    if not 1 <= args.port <= 65535 - args.replicas:
        print(f"kubellm up: --port must be in 1..{65535 - args.replicas}, got {args.port}", file=sys.stderr)
        return 2
    for host, port, what in planned_ports(args.host, args.port, args.replicas, use_router):
        if port_in_use(host, port):
            print(
                f"kubellm up: port {port} is in use ({what}); is another `kubellm up` running? "
                "Choose other ports with --port N (make up PORT=N)",
                file=sys.stderr,
            )
            return 2
    name = args.served_model_name or args.model
    front = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    stack = Stack()
    stop_requested = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    code = 0
    try:
        for i in range(args.replicas):
            port = args.port + 1 + i if use_router else args.port
            host = "127.0.0.1" if use_router else args.host
            url = f"http://127.0.0.1:{port}"
            serve = ["serve", args.model, "--host", host, "--port", str(port), "--device", args.device]
            serve += ["--served-model-name", name, *extra]
            stack.children.append(_spawn(f"engine-{i}", url if use_router else front, serve))
        print(f"kubellm up: starting {args.replicas} engine(s) on {args.model} ({args.device})...", flush=True)
        for child in stack.children:
            _wait_healthy(stack, child, READY_TIMEOUT_S)
        if use_router:
            # one router process: a local stack's load needs no more, and N workers of ~60 MB each would not be free
            router = ["router", "--host", args.host, "--port", str(args.port), "--model", name, "--workers", "1"]
            for child in stack.children:
                router += ["--backend", child.url]
            if args.policy:
                router += ["--policy", args.policy]
            stack.children.append(_spawn("router", front, router))
            _wait_healthy(stack, stack.children[-1], 60.0)
        print(
            f"\nkubellm is up. OpenAI base URL: {front}/v1  (model: {name}; "
            f"{args.replicas} engine(s){', behind the router' if use_router else ''})\n"
            f"  curl {front}/v1/chat/completions -H 'Content-Type: application/json' "
            f'-d \'{{"model": "{name}", "messages": [{{"role": "user", "content": "Hello!"}}]}}\'\n'
            "Press Ctrl-C to stop.",
            flush=True,
        )
        while True:
            gone = stack.dead()
            if gone is not None:
                say(f"kubellm up: {gone.name} exited with code {gone.proc.returncode}; stopping")
                code = 1
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        code = 0 if stop_requested else 130
    except RuntimeError as e:
        say(f"kubellm up: {e}")
        code = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        say("kubellm up: stopping...")
        stack.stop()
        say("kubellm up: stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
