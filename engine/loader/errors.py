"""Errors of model loading; each message names the problem and the path."""

from __future__ import annotations

from kubellm.engine.model_config import UnsupportedModelError


class ModelLoadError(RuntimeError):
    """The model could not be loaded: unknown path, missing or corrupt files, weights that do not fit."""


__all__ = ["ModelLoadError", "UnsupportedModelError"]
