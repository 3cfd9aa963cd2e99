"""Fixtures for the ship tests: the real helm binary and the chart rendered once per values file."""

from __future__ import annotations

from pathlib import Path

import pytest

from .tools import CHART, ci_values_files, helm_template, k8s_binaries

# The default values, then every values file under charts/kubellm/ci/ (what `ct lint` would also run).
VALUES_CASES: list[Path | None] = [None, *ci_values_files()]


def _case_id(case: Path | None) -> str:
    return "default" if case is None else case.stem


@pytest.fixture(scope="session")
def binaries() -> dict[str, Path]:
    return k8s_binaries()


@pytest.fixture(scope="session")
def rendered_streams(binaries) -> dict[str, str]:
    """`helm template` output per values case, rendered once per session (each run costs ~100 ms)."""
    return {_case_id(c): helm_template(*([c] if c else [])) for c in VALUES_CASES}


@pytest.fixture(scope="session")
def chart_dir() -> Path:
    return CHART
