"""bench/router.py's readings of the machine: a core's time split (/proc/stat, on fixed tick counts) and the TCP
segments sent (/proc/net/snmp)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from bench.router import core_split, core_times, tcp_segments


def test_core_split_shares_of_the_ticks_between_two_readings():
    # /proc/stat's order: user, nice, system, idle, iowait, irq, softirq, steal
    before = [100, 5, 40, 1000, 10, 0, 20, 3]
    after = [160, 5, 50, 1010, 10, 2, 38, 3]  # +60 user, +10 system, +10 idle, +2 irq, +18 softirq = 100 ticks
    split = core_split(before, after)
    assert split == pytest.approx({"user": 0.60, "system": 0.10, "softirq": 0.20, "idle": 0.10, "steal": 0.0})
    assert core_split(None, after) == {}  # no /proc/stat: no split, not an error


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="no /proc/stat")
def test_core_times_reads_core_zero():
    t = core_times(0)
    assert t is not None and len(t) == 8 and all(x >= 0 for x in t)
    assert core_times(10**6) is None  # no such core


@pytest.mark.skipif(not Path("/proc/net/snmp").exists(), reason="no /proc/net/snmp")
def test_tcp_segments_counts_what_a_loopback_exchange_sends():
    with socket.create_server(("127.0.0.1", 0)) as srv:
        before = tcp_segments()
        with socket.create_connection(srv.getsockname()) as c, srv.accept()[0] as s:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(20):  # 20 messages each way, each its own segment (NODELAY, read before the next)
                c.sendall(b"x" * 100)
                assert s.recv(200) == b"x" * 100
                s.sendall(b"y")
                assert c.recv(10) == b"y"
        after = tcp_segments()
    assert before is not None and after is not None
    assert after - before >= 40 + 3  # the 40 messages and the handshake at least (other traffic only adds)
