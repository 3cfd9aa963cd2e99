"""Every setting has a flag: each config dataclass field and each KUBELLM_* environment variable the code reads
appears in the --help of the command that uses it (the flags are generated from the dataclasses, so this
catches a field added with no flag, and an environment variable read behind the flags' back)."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

from kubellm.config_flags import flag_name
from kubellm.engine.config import EngineConfig
from kubellm.engine.server.chat_tools import ChatParsingConfig
from kubellm.engine.server.cli import ServeArgs
from kubellm.router.config import RouterConfig

ROOT = Path(__file__).resolve().parents[2]
# Every KUBELLM_* name in the source counts as read (a constant naming one is how a module reads it), except these,
# which are no settings: each with the reason.
NOT_SETTINGS = {
    "KUBELLM_PARENT_PID": "set by kubellm for its own child processes (kubellm/parent_watch.py)",
}
WRITTEN_NOT_READ = {
    ("operator", "KUBELLM_API_KEY"): "the operator writes it into the router's pod spec; `kubellm router` reads it",
}
NAME = re.compile(r"""["'](KUBELLM_[A-Z0-9_]*[A-Z0-9])["']""")
COMMANDS = {"kubellm": "serve", "engine": "serve", "router": "router", "operator": "operator"}


def _help(command: str) -> str:
    env = {**os.environ, "COLUMNS": "200"}
    out = subprocess.run(
        [sys.executable, "-m", "kubellm.cli", command, "--help"], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def _variables_read(folder: str) -> set[str]:
    found = set()
    for path in (ROOT / folder).rglob("*.py"):
        found.update(NAME.findall(path.read_text(encoding="utf-8")))
    return {n for n in found if n not in NOT_SETTINGS and (folder, n) not in WRITTEN_NOT_READ}


def test_every_config_field_and_environment_variable_has_a_flag_in_help():
    helps = {cmd: _help(cmd) for cmd in set(COMMANDS.values())}
    missing = []
    for cls, cmd in (
        (EngineConfig, "serve"),
        (ServeArgs, "serve"),
        (ChatParsingConfig, "serve"),
        (RouterConfig, "router"),
    ):
        for field in dataclasses.fields(cls):
            if field.name in ("engine", "served_model_names", "chat_parsing"):
                continue  # ServeArgs' parts: configs checked on their own, the names (--served-model-name)
            if flag_name(field) not in helps[cmd]:
                missing.append(f"{cls.__name__}.{field.name} ({flag_name(field)}) not in `kubellm {cmd} --help`")
    variables = {}
    for folder, cmd in COMMANDS.items():
        for name in _variables_read(folder):
            variables[name] = cmd
            if name not in helps[cmd]:
                missing.append(f"{name} (read in {folder}/) not in `kubellm {cmd} --help`")
    assert not missing, "\n".join(missing)
    # the scan itself works: it finds the variables behind flags of each command
    assert {"KUBELLM_NUM_THREADS", "KUBELLM_MOE_KERNEL", "KUBELLM_CACHE_DIR"} <= variables.keys()
    assert variables.get("KUBELLM_UPSTREAM_API_KEY") == "router"


def test_help_shows_real_defaults():
    serve = _help("serve")
    assert re.search(r"--max-num-seqs MAX_NUM_SEQS\s+most requests in one batch \(default: 256\)", serve)
    assert re.search(r"--long-prefill-token-threshold \S+\s+.*\(default: 0\)", serve)
    router = _help("router")
    assert re.search(r"--retry-backoff \S+\s+.*\(default: 0\.02\)", router)
