"""The project installs as one package with three namespaced parts and never shadows the stdlib."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOP_LEVEL = [
    "pyproject.toml",
    "engine",
    "router",
    "operator",
    "charts",
    "crds",
    "tests",
    "Dockerfile",
    "README.md",
    "Makefile",
    ".ci/run",
    "bench",
    "examples",
]


@pytest.mark.parametrize("path", TOP_LEVEL)
def test_layout_has_the_design_cards_top_level(path):
    assert (REPO / path).exists(), f"{path} missing from the repository root"


@pytest.mark.parametrize("name", ["kubellm", "kubellm.engine", "kubellm.router", "kubellm.operator"])
def test_parts_import_under_kubellm_names(name):
    importlib.import_module(name)


def test_stdlib_operator_is_not_shadowed_from_repo_root():
    # -S: site's start-up imports operator itself and would hide the shadowing.
    out = subprocess.run(
        [sys.executable, "-S", "-c", "import operator; print(operator.itemgetter)"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "itemgetter" in out.stdout


@pytest.mark.parametrize("name", ["engine", "router", "operator"])
def test_no_top_level_part_module_with_code(name):
    # A folder without __init__.py is at most an empty namespace; engine/ refuses a top-level import.
    code = f"import {name} as m; print(getattr(m, '__file__', None))"
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=REPO, capture_output=True, text=True)
    if name == "operator":
        assert out.returncode == 0 and "operator.py" in out.stdout  # the standard library's
    else:
        assert out.returncode != 0 or out.stdout.strip() == "None", out.stdout


def test_core_imports_no_part_and_no_torch_or_aiohttp():
    code = (
        "import sys, kubellm, kubellm.cli, kubellm.block_hash, kubellm.prompt, kubellm.kv_events, "
        "kubellm.metric_names, kubellm.builtin_models, kubellm.openai_protocol, kubellm.openai_errors; "
        "bad = [m for m in sys.modules if m in ('torch', 'aiohttp') or m.startswith(('kubellm.engine', "
        "'kubellm.router', 'kubellm.operator'))]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_pyproject_pins_cpu_torch_and_gpu_flashinfer():
    text = (REPO / "pyproject.toml").read_text()
    assert "torch==2.13.0" in text
    assert "flashinfer-python==0.6.18.post1" in text


def test_ci_runs_make_test_and_nothing_else():
    lines = [ln for ln in (REPO / ".ci/run").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert any(ln.strip() == "make test" for ln in lines)
    assert all(ln.startswith(("set ", "cd ", "make test")) for ln in lines), lines


def test_every_code_folder_is_a_listed_package():
    """A wheel only carries listed packages: a new sub-folder must be added to pyproject's list."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    roots = {
        "kubellm": "kubellm",
        "engine": "kubellm.engine",
        "router": "kubellm.router",
        "operator": "kubellm.operator",
    }
    found = set()
    for folder, package in roots.items():
        for d in [REPO / folder, *(p for p in (REPO / folder).rglob("*") if p.is_dir())]:
            if "__pycache__" in d.parts or not any(d.glob("*.py")):
                continue
            rel = d.relative_to(REPO / folder)
            found.add(".".join([package, *rel.parts]))
    assert found == listed
