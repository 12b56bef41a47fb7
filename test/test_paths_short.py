"""Short connections (no periodic sample, < 250 ms) over two paths: the end line's paths=
on both relays of the pair names the paths that carried the bytes, whichever side closed
first (issue 13; the samples at connect and at the non-MPTCP peer's EOF only count
subflows since 18d18ad)."""

from __future__ import annotations

import re
import socket
import threading
import time

import pytest
from netns import wait_until
from test_paths import PORT, ns_socket, two_paths

from mptcpproxy import connlog

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(120)]

EXCHANGES = 12
CLOSED_SHARE = re.compile(r"closed subflows (\d+)%")


CONN = connlog.Conn(("10.123.220.1", 40000), ("10.123.220.2", PORT), True)


def listening(srv, proto: int = 262) -> socket.socket:
    """A listener on PORT inside `srv` (MPTCP unless `proto` is 0)."""
    lst = ns_socket(srv, proto)
    lst.bind(("0.0.0.0", PORT))
    lst.listen(16)
    lst.settimeout(10)
    return lst


def connected(cli, lst: socket.socket, dst: str) -> tuple[socket.socket, socket.socket]:
    """An MPTCP client socket of `cli` connected to `lst`, and its accepted end."""
    up = ns_socket(cli)
    up.settimeout(10)
    up.connect((dst, PORT))
    conn, _ = lst.accept()
    conn.settimeout(10)
    return up, conn


def relay_to_sink(relay, conn: socket.socket, conn_id: int) -> socket.socket:
    """Hand `conn` (the MPTCP leg) and a socketpair to `relay`; returns the sink's end."""
    sink, y = socket.socketpair()
    relay.add(conn.fileno(), y.detach(), conn_id, conn.fileno())
    conn.detach()
    sink.settimeout(10)
    return sink


def through_pair(relays: list, lst: socket.socket, cli, dst: str,
                 conn_id: int) -> tuple[socket.socket, socket.socket]:
    """An application's socket into client relay =MPTCP= server relay and the sink's end
    behind them, once the second path has had time to join (still far from the first
    periodic sample)."""
    up, conn = connected(cli, lst, dst)
    app, b = socket.socketpair()
    relays[0].add(b.detach(), up.fileno(), conn_id, up.fileno())
    up.detach()
    sink = relay_to_sink(relays[1], conn, conn_id)
    app.settimeout(10)
    time.sleep(0.05)
    return app, sink


def read_all(sock: socket.socket) -> int:
    n = 0
    while data := sock.recv(65536):
        n += len(data)
    return n


def _exchange(relays: list, lst: socket.socket, cli, dst: str, request: int, response: int,
              conn_id: int) -> None:
    """One request/response through client relay =MPTCP= server relay: the client sends
    its request and half-closes at once (`nc -N`), then reads the response to its end."""
    app, sink = through_pair(relays, lst, cli, dst, conn_id)
    with app, sink:
        got = [0]

        def serve() -> None:
            got[0] = read_all(sink)
            sink.sendall(b"r" * response)
            sink.shutdown(socket.SHUT_WR)

        server = threading.Thread(target=serve)
        server.start()
        app.sendall(b"q" * request)
        app.shutdown(socket.SHUT_WR)
        received = read_all(app)
        server.join(10)
    assert (got[0], received) == (request, response)


def _results(relays: list, count: int) -> list[dict]:
    got: list[dict] = [{}, {}]

    def collect() -> bool:
        for i, relay in enumerate(relays):
            for r in relay.collect():
                got[i][r.conn_id] = r
        return all(len(g) >= count for g in got)

    wait_until(collect, 20, "both relays' results")
    return got


@pytest.mark.parametrize("response", [3000, 100_000])
def test_a_short_exchange_whose_client_closes_first_names_its_paths_on_both_relays(
        testbed, engine, response) -> None:
    """The server relay sends its response after the MPTCP client's DATA_FIN: its end
    line still gives most bytes to the two paths, not to "closed subflows" (18d18ad: on
    most such connections 0 % on each path and 100 % "closed subflows"; before it, the
    bytes still in flight at the last listed sample, up to a third of a 400 kB answer)."""
    cli, srv, l1, _ = two_paths(testbed, rates=None)
    relays = [engine(path_stats=True), engine(path_stats=True)]
    lst = listening(srv)
    try:
        for conn_id in range(1, EXCHANGES + 1):
            _exchange(relays, lst, cli, l1.ip_b, 100, response, conn_id)
        client, server = _results(relays, EXCHANGES)
    finally:
        for relay in relays:
            relay.close()
        lst.close()
    for side, results in (("client", client), ("server", server)):
        for r in results.values():
            line, _ = connlog.end_line(r, CONN, fields=False)
            assert r.reason == "closed" and r.is_mptcp and " paths=" in line, (side, line)
            closed = CLOSED_SHARE.search(line)
            assert r.subflows < 2 or not closed or int(closed[1]) < 50, (side, line)
