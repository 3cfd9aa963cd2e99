"""The benchmark package (bench/) imported as `bench`: pytest puts test folders on sys.path, not the repository
root. Appended, not prepended, so the root's engine/, router/ and operator/ folders never shadow anything."""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)
