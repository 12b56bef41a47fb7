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


def _exchange(relays: list, lst: socket.socket, cli, dst: str, request: int, response: int,
              conn_id: int) -> None:
    """One request/response through client relay =MPTCP= server relay: the client sends
    its request and half-closes at once (`nc -N`), then reads the response to its end."""
    up = ns_socket(cli)
    up.settimeout(10)
    up.connect((dst, PORT))
    app, b = socket.socketpair()
    conn, _ = lst.accept()
    relays[0].add(b.detach(), up.fileno(), conn_id, up.fileno())
    up.detach()
    sink, y = socket.socketpair()
    relays[1].add(conn.fileno(), y.detach(), conn_id, conn.fileno())
    conn.detach()
    with app, sink:
        app.settimeout(10)
        sink.settimeout(10)
        time.sleep(0.05)  # the second path's join (still far from the first periodic sample)
        got = [0]

        def serve() -> None:
            while data := sink.recv(65536):
                got[0] += len(data)
            sink.sendall(b"r" * response)
            sink.shutdown(socket.SHUT_WR)

        server = threading.Thread(target=serve)
        server.start()
        app.sendall(b"q" * request)
        app.shutdown(socket.SHUT_WR)
        received = 0
        while data := app.recv(65536):
            received += len(data)
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
    lst = ns_socket(srv)
    try:
        lst.bind(("0.0.0.0", PORT))
        lst.listen(16)
        lst.settimeout(10)
        for conn_id in range(1, EXCHANGES + 1):
            _exchange(relays, lst, cli, l1.ip_b, 100, response, conn_id)
        client, server = _results(relays, EXCHANGES)
    finally:
        for relay in relays:
            relay.close()
        lst.close()
    conn = connlog.Conn(("10.123.220.1", 40000), ("10.123.220.2", PORT), True)
    for side, results in (("client", client), ("server", server)):
        for r in results.values():
            line, _ = connlog.end_line(r, conn, fields=False)
            assert r.reason == "closed" and r.is_mptcp and " paths=" in line, (side, line)
            closed = CLOSED_SHARE.search(line)
            assert r.subflows < 2 or not closed or int(closed[1]) < 50, (side, line)
