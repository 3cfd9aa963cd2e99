"""kubellm: the shared core (CLI, prefix block hash, prompt rendering, protocol types, metric names).

The three parts live in the top-level folders engine/, router/ and operator/ and import as
kubellm.engine, kubellm.router and kubellm.operator. operator/ and router/ carry no __init__.py so that
nothing importable named `operator` sits in the checkout's root to shadow the standard library.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "operator").is_dir():
    # Editable install from a checkout: setuptools' editable finder cannot map a namespace sub-package
    # (operator/ has no __init__.py), so let kubellm's package path reach the checkout's part folders.
    __path__.append(str(_checkout))
