"""Shared fixtures: the embedded model, and the gpu marker's clean skip without CUDA."""

from __future__ import annotations

import pytest

import kubellm  # noqa: F401  (first: sets process-wide CPU threading defaults before torch loads)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def embedded_model_path():
    from kubellm.builtin_models import builtin_model_path

    return builtin_model_path()
