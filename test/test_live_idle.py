"""The live view (relay.connections(), what /connections serves) of MPTCP connections that
have not been path-sampled by the scan yet: idle ones, young ones (< 250 ms), fallbacks
(issue 13; the samples at connect only count subflows since 18d18ad, only ask
TCP_IS_MPTCP since 525589e)."""

from __future__ import annotations

import socket
import time

import pytest
from netns import wait_until
from test_paths import two_paths
from test_paths_short import CONN, connected, listening

from mptcpproxy import connlog

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(60)]


def _client_relayed(relay, cli, lst, dst: str, conn_id: int) -> tuple[socket.socket, ...]:
    """app =socketpair= relay =MPTCP client socket= the accepted end; returns (app, conn)."""
    up, conn = connected(cli, lst, dst)
    app, b = socket.socketpair()
    app.settimeout(10)
    fd = up.detach()
    relay.add(b.detach(), fd, conn_id, fd)
    return app, conn


def _paths_listed(stat, local: str) -> None:
    assert stat.is_mptcp and stat.subflows >= 1, stat
    assert local in [p.local[0] for p in stat.paths], stat


def test_an_idle_mptcp_connection_shows_its_path_in_the_live_view(testbed, engine) -> None:
    cli, srv, l1, _ = two_paths(testbed, rates=None)
    relay = engine(path_stats=True)
    lst = listening(srv)
    try:
        app, conn = _client_relayed(relay, cli, lst, l1.ip_b, 1)
        with conn, app:
            # a publication (once a second) well past the first periodic sample's time
            (stat,) = wait_until(lambda: [c for c in relay.connections() if c.age > 1.5],
                                 10, "a listing past 1.5 s")
            _paths_listed(stat, l1.ip_a)
    finally:
        relay.close()
        lst.close()


def test_a_young_mptcp_connection_shows_its_path_in_the_live_view(testbed, engine) -> None:
    """Connections registered every 125 ms for a second: the workers' publication (once a
    second) lists the youngest before its first periodic sample (a quarter second in).
    f1f749d listed its path (the sample at connect was a path sample); main lists
    is_mptcp=True subflows=1 paths=() on both engines."""
    cli, srv, l1, _ = two_paths(testbed, rates=None)
    relay = engine(path_stats=True)
    lst = listening(srv)
    keep: list[socket.socket] = []
    first_seen: dict = {}
    try:
        for conn_id in range(1, 10):
            keep += _client_relayed(relay, cli, lst, l1.ip_b, conn_id)
            deadline = time.monotonic() + 0.125
            while time.monotonic() < deadline:
                for stat in relay.connections():
                    first_seen.setdefault(stat.conn_id, stat)
                time.sleep(0.005)
        young = [s for s in first_seen.values() if s.age < 0.2]
        assert young, first_seen
        for stat in young:
            _paths_listed(stat, l1.ip_a)
    finally:
        relay.close()
        lst.close()
        for s in keep:
            s.close()


def test_a_fallback_connection_is_plain_tcp_from_the_start(testbed, engine) -> None:
    """A server without MPTCP: the live view and the end line say so from the first look."""
    cli, srv, l1, _ = two_paths(testbed, rates=None)
    relay = engine(path_stats=True)
    lst = listening(srv, 0)
    try:
        app, conn = _client_relayed(relay, cli, lst, l1.ip_b, 1)
        with conn, app:
            (stat,) = wait_until(lambda: relay.connections(), 10, "the live view")
            assert (stat.is_mptcp, stat.subflows, tuple(stat.paths)) == (False, 0, ()), stat
            app.sendall(b"x" * 1000)
            app.shutdown(socket.SHUT_WR)
            n = 0
            while data := conn.recv(65536):
                n += len(data)
            conn.shutdown(socket.SHUT_WR)
            (res,) = wait_until(lambda: relay.collect(), 10, "the result")
    finally:
        relay.close()
        lst.close()
    line, _ = connlog.end_line(res, CONN, fields=False)
    assert n == 1000 and "mptcp=no (fell back to TCP)" in line and "paths=" not in line, line
