"""Child processes that die with their parent: the kernel's parent-death signal, plus a polling thread as a
fallback (the signal is Linux-only, and is lost if the parent died before it was armed).

Used by tensor-parallel workers (SIGKILL: they hold no state worth saving) and by the `kubellm serve` /
`kubellm router` children of `kubellm up` (SIGTERM: they stop as on Ctrl-C), so closing a terminal or killing
`kubellm up` never leaves servers holding its ports.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
import time

PARENT_PID_ENV = "KUBELLM_PARENT_PID"  # set by `kubellm up` for its children
PR_SET_PDEATHSIG = 1
POLL_S = 0.5


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL, exit_after_s: float | None = None) -> None:
    """Send `sig` to this process when `parent_pid` stops being its parent. `exit_after_s`: if the process is
    still alive that long after the signal (a graceful stop that hangs), it exits at once."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(POLL_S)
        os.kill(os.getpid(), sig)
        if exit_after_s is not None:
            time.sleep(exit_after_s)
            os._exit(1)

    threading.Thread(target=watch, name="kubellm-parent-watch", daemon=True).start()


def arm_from_env(exit_after_s: float = 10.0) -> bool:
    """Called first thing by the `kubellm` CLI: when `kubellm up` started this process, stop gracefully
    (SIGTERM) once it is gone. The variable is removed so grandchildren do not watch the wrong parent."""
    raw = os.environ.pop(PARENT_PID_ENV, None)
    if not raw or not raw.isdigit():
        return False
    die_with_parent(int(raw), signal.SIGTERM, exit_after_s)
    return True
