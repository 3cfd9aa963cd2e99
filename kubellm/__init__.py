"""kubellm: the shared core (CLI, prefix block hash, prompt rendering, protocol types, metric names).

The three parts live in the top-level folders engine/, router/ and operator/ and import as
kubellm.engine, kubellm.router and kubellm.operator. operator/ and router/ carry no __init__.py so that
nothing importable named `operator` sits in the checkout's root to shadow the standard library.
"""

import os as _os
from pathlib import Path as _Path

__version__ = "0.1.0"

# OpenMP threads that spin while waiting collapse CPU matmuls (20x measured on 2 cores) as soon as another
# busy process shares the cores — an engine beside a router, or several replicas of `kubellm up`. Passive
# waiting costs little when alone. It must be set before torch loads OpenMP, hence here, in the core.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "operator").is_dir():
    # Editable install from a checkout: setuptools' editable finder cannot map a namespace sub-package
    # (operator/ has no __init__.py), so let kubellm's package path reach the checkout's part folders.
    __path__.append(str(_checkout))
