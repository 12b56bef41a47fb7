"""Short connections over two paths whose *server* closes first (HTTP/1.0, SMTP QUIT, any
`Connection: close` answer): the client does not half-close; the server reads the request,
answers and closes, then the client closes. On the server relay the non-MPTCP peer's EOF
comes first (not sampled since 525589e), and the MPTCP client's DATA_FIN only after the
proxy's own DATA_FIN went out: the end line's paths= must still name the paths that
carried the bytes (issue 13). Held on main and on f1f749d, both engines."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import closing

import pytest
from netns import wait_until
from test_paths import two_paths
from test_paths_short import (
    CLOSED_SHARE,
    CONN,
    EXCHANGES,
    _results,
    connected,
    listening,
    read_all,
    relay_to_sink,
    through_pair,
)

from mptcpproxy import connlog

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(120)]

def answer_and_close(sink: socket.socket, request: int, response: int) -> int:
    """The server: reads the request, answers, closes first; returns the bytes read."""
    got = 0
    while got < request and (data := sink.recv(65536)):
        got += len(data)
    sink.sendall(b"r" * response)
    sink.shutdown(socket.SHUT_WR)
    return got


def check_lines(results) -> None:
    lines = [(r.subflows, connlog.end_line(r, CONN, fields=False)[0]) for r in results]
    print("\n".join(map(str, lines)))
    for subflows, line in lines:
        assert " paths=" in line and "mptcp=yes" in line, line
        closed = CLOSED_SHARE.search(line)
        assert subflows < 2 or not closed or int(closed[1]) < 50, line


def _exchange(relays: list, lst: socket.socket, cli, dst: str, request: int, response: int,
              conn_id: int) -> None:
    """client relay =MPTCP= server relay: the client sends its request and reads the answer
    to its end; the server answers and closes first; then the client half-closes."""
    app, sink = through_pair(relays, lst, cli, dst, conn_id)
    with app, sink:
        got = [0]
        server = threading.Thread(target=lambda: got.__setitem__(
            0, answer_and_close(sink, request, response)))
        server.start()
        app.sendall(b"q" * request)
        received = read_all(app)
        app.shutdown(socket.SHUT_WR)  # then the client
        server.join(10)
        assert sink.recv(1) == b""
    assert (got[0], received) == (request, response)


@pytest.mark.parametrize("response", [3000, 100_000])
def test_a_short_exchange_whose_server_closes_first_names_its_paths_on_both_relays(
        testbed, engine, response) -> None:
    cli, srv, l1, _ = two_paths(testbed, rates=None)
    relays = [engine(path_stats=True), engine(path_stats=True)]
    with listening(srv) as lst, closing(relays[0]), closing(relays[1]):
        for conn_id in range(1, EXCHANGES + 1):
            _exchange(relays, lst, cli, l1.ip_b, 100, response, conn_id)
        results = _results(relays, EXCHANGES)
    check_lines([*results[0].values(), *results[1].values()])


@pytest.mark.parametrize("response", [3000, 100_000])
def test_server_closes_first_then_an_mptcp_client_closes_its_socket(testbed, engine,
                                                                     response) -> None:
    """An MPTCP client of its own (no client relay) =MPTCP= server relay = sink: the
    server answers and closes first, then the client close()s its socket."""
    cli, srv, l1, _ = two_paths(testbed, rates=None)
    relay = engine(path_stats=True)
    lst = listening(srv)
    got: dict = {}
    try:
        for conn_id in range(1, EXCHANGES + 1):
            up, conn = connected(cli, lst, l1.ip_b)
            with relay_to_sink(relay, conn, conn_id) as sink:
                time.sleep(0.05)  # the second path's join
                up.sendall(b"q" * 100)
                assert answer_and_close(sink, 100, response) == 100
                assert read_all(up) == response
                up.close()
                assert sink.recv(1) == b""

        def collect() -> bool:
            got.update((r.conn_id, r) for r in relay.collect())
            return len(got) >= EXCHANGES

        wait_until(collect, 20, "the relay's results")
    finally:
        relay.close()
        lst.close()
    check_lines(got.values())
