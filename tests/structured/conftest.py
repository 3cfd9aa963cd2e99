"""Fixtures for the structured-output tests: the embedded SmolLM2, loaded once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "engine_server"))  # server_harness


@pytest.fixture(scope="session")
def smollm2(embedded_model_path):
    from kubellm.engine.loader import load_model

    return load_model(str(embedded_model_path))
