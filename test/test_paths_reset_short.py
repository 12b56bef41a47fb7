"""A short MPTCP connection reset before its first periodic sample (a quarter second in):
its JSON fields report the connection-level totals exactly (issue 13). Its paths are
empty since 18d18ad (f1f749d listed the subflows sampled at connect: the compiled engine
with 0 % each and "closed subflows 100%", the twin with the initial subflow at 100 %)."""

from __future__ import annotations

import socket
import struct
import time

import pytest
from netns import wait_until
from test_paths import two_paths
from test_paths_short import CONN, connected, listening, relay_to_sink

from mptcpproxy import connlog

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(60)]

SIZE = 200_000


def test_a_short_connection_reset_by_its_mptcp_client_keeps_its_totals(testbed, engine):
    cli, srv, l1, _ = two_paths(testbed, rates=None)
    relay = engine(path_stats=True)
    lst = listening(srv)
    got: dict = {}
    try:
        up, conn = connected(cli, lst, l1.ip_b)
        with relay_to_sink(relay, conn, 1) as sink:
            up.sendall(b"q" * SIZE)
            n = 0
            while n < SIZE and (data := sink.recv(65536)):
                n += len(data)
            sink.sendall(b"r" * 5000)
            r = 0
            while r < 5000 and (data := up.recv(65536)):
                r += len(data)
            up.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            up.close()  # an abortive close
            time.sleep(0.02)

            def collect() -> bool:
                got.update((x.conn_id, x) for x in relay.collect())
                return 1 in got

            wait_until(collect, 10, "the result")
    finally:
        relay.close()
        lst.close()
    line, fields = connlog.end_line(got[1], CONN, fields=True)
    assert got[1].reason == "reset" and got[1].is_mptcp and "mptcp=yes" in line, line
    # the connection's totals survive the reset; its paths= (no path sample was taken
    # before it: the samples at connect only ask TCP_IS_MPTCP) is documented as empty
    assert (fields["mptcp_bytes_received"], fields["mptcp_bytes_sent"]) == (SIZE, 5000), fields
