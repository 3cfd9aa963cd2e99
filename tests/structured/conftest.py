"""Fixtures for the structured-output tests: the embedded SmolLM2, loaded once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2(embedded_model_path):
    from kubellm.engine.loader import load_model

    return load_model(str(embedded_model_path))
