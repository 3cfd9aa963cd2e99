"""Fixtures for the router's tests: fake engines (real HTTP servers) and a router in front of them."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
