"""Fixtures for the engine server tests (the harness itself lives in server_harness.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from server_fakes import FakeEngine
from server_harness import ServerThread


@pytest.fixture(scope="module")
def fake_server() -> Iterator[ServerThread]:
    st = ServerThread(lambda: FakeEngine(), max_waiting=64).start()
    yield st
    st.stop()
