"""The `kubellm` CLI: one entry point, every --help works, nothing ends in a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kubellm.cli import SUBCOMMANDS


def run_cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "kubellm"
    assert exe.exists(), "the kubellm console script is installed beside the interpreter"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)


def test_top_level_help_lists_every_subcommand():
    out = run_cli("--help")
    assert out.returncode == 0
    for name in SUBCOMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("name", [n for n in SUBCOMMANDS if n != "version"])
def test_each_subcommand_help_exits_zero(name):
    out = run_cli(name, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout.lower()
    assert "Traceback" not in out.stderr


def test_version():
    out = run_cli("version")
    assert out.returncode == 0 and out.stdout.startswith("kubellm ")


def test_unknown_subcommand_is_a_one_line_error():
    out = run_cli("frobnicate")
    assert out.returncode == 2
    assert "unknown subcommand" in out.stderr and "Traceback" not in out.stderr
