"""Shared fixtures: the embedded model, and the gpu marker's clean skip without CUDA."""

from __future__ import annotations

import sys
from pathlib import Path

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


# ---- a real `kubellm serve` subprocess per test module, and the official openai client against it --------------
# A module sets the server's flags by overriding `serve_args`; the fixtures below start it once for the module.
OPENAI_TIMEOUT_S = 600  # per request: a ceiling for a loaded 2-core CI machine, never a pace the tests rely on


@pytest.fixture(scope="module")
def serve_args() -> tuple[str, ...]:
    """The flags (after --host and --port) of this module's `kubellm serve`; override it in the module."""
    return ("--device", "cpu")


@pytest.fixture(scope="module")
def serve_process(serve_args):
    """`kubellm serve` with `serve_args`, ready (health 200) before the first test, stopped after the last."""
    harness_dir = str(Path(__file__).parent / "engine_server")
    if harness_dir not in sys.path:
        sys.path.insert(0, harness_dir)
    from server_harness import ServeProcess

    proc = ServeProcess(*serve_args)
    try:
        yield proc.wait_ready()
    finally:
        proc.terminate()


@pytest.fixture(scope="module")
def openai_client(serve_process):
    import openai

    client = openai.OpenAI(base_url=serve_process.url + "/v1", api_key="none", max_retries=0, timeout=OPENAI_TIMEOUT_S)
    yield client
    client.close()


@pytest.fixture
def async_openai_client(serve_process):
    """Per test: an async client binds to the event loop of the test that first uses it."""
    import openai

    return openai.AsyncOpenAI(
        base_url=serve_process.url + "/v1", api_key="none", max_retries=0, timeout=OPENAI_TIMEOUT_S
    )
