"""Which paths carried the bytes (issue 13), on network namespaces: two veth paths shaped
60/40 Mbit/s, a relay on each side of the MPTCP leg (the test's own sockets, made inside
the namespaces), and what Result.paths, Relay.connections() and the path metrics say
when a path goes down, an endpoint is removed, the peer resets, or MPTCP falls back."""

from __future__ import annotations

import ctypes
import json
import socket
import struct
import sys
import threading
import time

import pytest
from netns import Host, TestBed, wait_until
from test_transparent import PROXY_ENV, conn_ends

from mptcpproxy import connlog

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(120)]

PORT = 4444
BLOCK = b"\x5a" * 65536
SHARE_TOLERANCE = 10  # percentage points, as the issue asks


def ns_socket(host: Host, proto: int = 262) -> socket.socket:
    """An IPv4 socket of this process made inside `host` (MPTCP unless `proto` is 0)."""
    made: list = []

    def make() -> None:  # setns() moves only this short-lived thread; the socket stays
        with open(f"/run/netns/{host.name}") as ns:
            if ctypes.CDLL(None, use_errno=True).setns(ns.fileno(), 0x40000000):
                made.append(OSError(ctypes.get_errno(), "setns failed"))
                return
        made.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto))

    thread = threading.Thread(target=make)
    thread.start()
    thread.join()
    if isinstance(made[0], OSError):
        raise made[0]
    return made[0]


def two_paths(bed: TestBed, rates: tuple[str, str] | None = ("60mbit", "40mbit")):
    cli, srv = bed.host("cli"), bed.host("srv")
    l1 = bed.link(cli, srv, "10.123.220.1/24", "10.123.220.2/24")
    l2 = bed.link(cli, srv, "10.123.221.1/24", "10.123.221.2/24")
    for link, rate in zip((l1, l2), rates or (), strict=False):
        link.shape(rate)
    srv.mptcp_limits(subflows=1)
    cli.mptcp_limits(subflows=1, add_addr_accepted=1)
    srv.mptcp_endpoint(l2.ip_b, l2.dev_b, "signal")
    return cli, srv, l1, l2


class Leg:
    """app =socketpair= [client relay] =MPTCP over two paths= [server relay, or the test
    itself with relay=False] =socketpair= sink. The sink counts what arrives."""

    def __init__(self, engine, cli: Host, srv: Host, dst: str, server_relay: bool = True,
                 server_proto: int = 262) -> None:
        self.socks: list[socket.socket] = []
        self.relays = [engine(path_stats=True)]
        self.received = 0
        self.resetting = False
        lst = self._keep(ns_socket(srv, server_proto))
        lst.bind(("0.0.0.0", PORT))
        lst.listen()
        lst.settimeout(10)
        up = self._keep(ns_socket(cli))
        up.settimeout(10)
        up.connect((dst, PORT))
        self.app, b = socket.socketpair()
        self.app.settimeout(20)
        conn, _ = lst.accept()
        self.relays[0].add(b.detach(), up.fileno(), 1, up.fileno())
        up.detach()
        if server_relay:
            self.relays.append(engine(path_stats=True))
            self.sink, y = socket.socketpair()
            self.relays[1].add(conn.fileno(), y.detach(), 2, conn.fileno())
            conn.detach()
        else:
            self.sink = conn
        self.sink.settimeout(20)
        self.reader = threading.Thread(target=self._read)
        self.reader.start()

    def _keep(self, sock: socket.socket) -> socket.socket:
        self.socks.append(sock)
        return sock

    def _read(self) -> None:
        try:
            while data := self.sink.recv(1 << 20):
                self.received += len(data)
            if not self.resetting:
                self.sink.shutdown(socket.SHUT_WR)  # the EOF back: both halves finish
        except OSError:
            pass

    def reset(self) -> None:
        """The sink resets its connection (SO_LINGER 0, close)."""
        self.resetting = True
        self.sink.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sink.shutdown(socket.SHUT_RD)  # wakes the reader, sends nothing
        self.reader.join(10)
        self.sink.close()

    def send_for(self, seconds: float, then=None, after: float = 0.0) -> int:
        """Send for `seconds`; call `then()` once `after` seconds have passed and the
        client relay has published both paths."""
        sent, start = 0, time.monotonic()
        while (now := time.monotonic()) < start + seconds:
            if (then is not None and now >= start + after
                    and len(live_paths(self.relays[0])) == 2):
                then()
                then = None
            self.app.sendall(BLOCK)
            sent += len(BLOCK)
        assert then is None, "the second path never showed"
        return sent

    def results(self, count: int | None = None) -> list:
        """The Results of both relays (client's first), waiting for them."""
        count = count or len(self.relays)
        got: dict[int, object] = {}

        def collect() -> bool:
            for relay in self.relays:
                for r in relay.collect():
                    got[r.conn_id] = r
            return len(got) >= count

        wait_until(collect, 20, "the relays' results")
        return [got[k] for k in sorted(got)]

    def end(self) -> list:
        self.app.shutdown(socket.SHUT_WR)
        self.reader.join(30)
        return self.results()

    def close(self) -> None:
        for relay in self.relays:
            relay.close()
        for sock in (*self.socks, self.app, self.sink):
            sock.close()


def live_paths(relay) -> tuple:
    conns = relay.connections()
    return conns[0].paths if conns else ()


@pytest.fixture
def leg_factory(testbed: TestBed):
    legs: list[Leg] = []

    def make(*args, **kw) -> Leg:
        legs.append(Leg(*args, **kw))
        return legs[-1]

    yield make
    for leg in legs:
        leg.close()


def by_local(paths: tuple) -> dict:
    return {p.local[0]: p for p in paths if p.id}


def test_shares_on_60_40_paths(testbed: TestBed, engine, leg_factory, capsys) -> None:
    """3 s over two paths shaped 60 and 40 Mbit/s: the sending relay's shares are 60/40
    (±10), live and at the end; the receiving relay's per-path bytes add up to what it
    relayed."""
    cli, srv, l1, l2 = two_paths(testbed)
    leg = leg_factory(engine, cli, srv, l1.ip_b)
    sent = leg.send_for(2.5)
    live = by_local(live_paths(leg.relays[0]))
    assert set(live) == {l1.ip_a, l2.ip_a} and not any(p.closed for p in live.values())
    assert {p.remote[0] for p in live.values()} == {l1.ip_b, l2.ip_b}
    sent += leg.send_for(0.5)
    client, server = leg.end()
    assert leg.received == sent == client.bytes_ab == server.bytes_ab
    assert (client.mptcp_bytes_sent, server.mptcp_bytes_received) == (sent, sent)
    shares = dict(connlog.path_shares(client.paths))
    first, second = f"{l1.ip_a}>{l1.ip_b}", f"{l2.ip_a}>{l2.ip_b}"
    assert abs(shares[first] - 60) <= SHARE_TOLERANCE, shares
    assert abs(shares[second] - 40) <= SHARE_TOLERANCE, shares
    # each subflow may count the peer's FIN; bytes MPTCP reinjected arrive on two paths
    got = sum(p.bytes_received for p in server.paths)
    assert 0 <= got - sent <= len(server.paths) + client.mptcp_bytes_retrans, (
        got - sent, client.mptcp_bytes_retrans)
    with capsys.disabled():  # the closing note's connection-end line
        print(f"\n[{engine.__module__}] paths="
              + ",".join(f"{p} {n}%" for p, n in connlog.path_shares(client.paths)))


def test_a_path_taken_down_shows_its_frozen_count_and_the_resent_bytes(
        testbed: TestBed, leg_factory) -> None:
    from mptcpproxy.relay._relay import Relay

    cli, srv, l1, l2 = two_paths(testbed)
    leg = leg_factory(Relay, cli, srv, l1.ip_b)
    sent = leg.send_for(2.8, then=l2.down, after=1.0)
    frozen = by_local(live_paths(leg.relays[0]))[l2.ip_a]
    sent += leg.send_for(0.6)
    client, _ = leg.end()
    assert leg.received == sent == client.mptcp_bytes_sent
    down = by_local(client.paths)[l2.ip_a]
    # still listed while the connection lived (not removed), its count frozen since
    assert not frozen.closed and down.bytes_acked == frozen.bytes_acked > 0
    # what it had sent and never got acknowledged, MPTCP sent again on the first path:
    # everything arrived, and the two paths' acknowledged bytes cover all of it (the
    # resend is not always in mptcpi_bytes_retrans on 6.18: it may be 0)
    assert down.bytes_sent > down.bytes_acked
    up = by_local(client.paths)[l1.ip_a]
    assert up.bytes_acked + down.bytes_acked >= sent and up.bytes_acked > down.bytes_acked


def test_an_endpoint_removed_mid_transfer_ends_with_exact_totals(
        testbed: TestBed, leg_factory) -> None:
    from mptcpproxy.relay._relay import Relay

    cli, srv, l1, l2 = two_paths(testbed)
    leg = leg_factory(Relay, cli, srv, l1.ip_b)
    sent = leg.send_for(2.5, then=lambda: srv.ip("mptcp", "endpoint", "flush"), after=1.0)
    assert by_local(live_paths(leg.relays[0]))[l2.ip_a].closed  # gone from the kernel
    client, server = leg.end()
    assert leg.received == sent == client.mptcp_bytes_sent == server.mptcp_bytes_received
    paths = by_local(client.paths)
    assert paths[l2.ip_a].bytes_acked > 0 and paths[l1.ip_a].bytes_acked > 0
    # every byte the connection moved is on a path: what the removed subflow moved after
    # the last sample was given to it
    assert sum(p.bytes_acked for p in client.paths) >= sent


def test_a_fast_close_keeps_the_last_sample_and_exact_totals(
        testbed: TestBed, engine, leg_factory) -> None:
    cli, srv, l1, l2 = two_paths(testbed)
    leg = leg_factory(engine, cli, srv, l1.ip_b, server_relay=False)
    sent = leg.send_for(1.5)
    wait_until(lambda: leg.received == sent, 20, "the bytes at the server")
    for _ in range(5):  # keep the pair busy: periodic samples after the bulk was acked
        leg.app.sendall(b"x")
        sent += 1
        time.sleep(0.3)
    wait_until(lambda: leg.received == sent, 5, "the last bytes")
    time.sleep(2.6)  # the last sample, then its publication
    last = live_paths(leg.relays[0])
    assert len(last) == 2
    # the server resets: MPTCP fast close; the kernel drops the subflows' data at once
    leg.reset()
    (client,) = leg.results(1)
    assert client.reason == "reset"
    assert client.mptcp_bytes_sent == client.bytes_ab == sent
    assert [(p.id, p.local, p.bytes_acked) for p in client.paths if p.id] == [
        (p.id, p.local, p.bytes_acked) for p in last]
    assert all(p.closed for p in client.paths)


def test_a_reset_after_the_clients_eof_keeps_the_bytes_on_their_paths(
        testbed: TestBed, engine, leg_factory) -> None:
    """The client half-closes after 1.6 s (past the scan's periodic samples), the server
    reads everything, then resets (iperf3's server does that): the kernel drops the
    subflows' counts at the reset, so the last sample is the per-path record. The one at
    the client's EOF holds nearly all the bytes (before: the last periodic sample, up to a
    second old, and the rest under "closed subflows")."""
    cli, srv, l1, _ = two_paths(testbed, rates=None)
    leg = leg_factory(engine, cli, srv, l1.ip_b, server_relay=False)
    sent = leg.send_for(1.6)
    leg.resetting = True  # the server answers the EOF with a reset, not a FIN
    leg.app.shutdown(socket.SHUT_WR)
    wait_until(lambda: leg.received == sent, 20, "the bytes at the server")
    leg.reset()
    (client,) = leg.results(1)
    assert client.reason == "reset" and client.mptcp_bytes_sent == sent
    shares = dict(connlog.path_shares(client.paths))
    assert shares.get("closed subflows", 0) < 10, connlog.paths_text(client.paths)


def test_a_fallback_connection_reports_no_paths(testbed: TestBed, engine, leg_factory) -> None:
    cli, srv, l1, _ = two_paths(testbed, rates=None)
    leg = leg_factory(engine, cli, srv, l1.ip_b, server_relay=False, server_proto=0)
    sent = leg.send_for(0.3)
    wait_until(lambda: leg.received == sent, 10, "the bytes")
    time.sleep(1.1)  # published
    (conn,) = leg.relays[0].connections()
    assert (conn.is_mptcp, conn.paths, conn.mptcp_bytes_sent) == (False, (), 0)
    (client,) = leg.end()[:1]
    assert (client.is_mptcp, client.paths, client.mptcp_bytes_sent) == (False, (), 0)


# -- the proxy: 200 clients from 200 addresses, the path metrics' labels ------------------

CLIENTS = 200
_CLIENT = """
import socket, sys
for i in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
    s.settimeout(10)
    s.bind((f"10.123.{230 + i // 250}.{1 + i % 250}", 0))
    s.connect((sys.argv[1], 4444))
    s.sendall(b"y" * 1000)
    s.shutdown(socket.SHUT_WR)
    while s.recv(65536):
        pass
    s.close()
"""


def _metrics(host: Host, port: int) -> str:
    return host.run([sys.executable, "-c", "import urllib.request, sys; sys.stdout.write("
                     f"urllib.request.urlopen('http://127.0.0.1:{port}/metrics', timeout=5)"
                     ".read().decode())"], timeout=20).stdout


def test_200_clients_leave_the_labels_at_the_hosts_own_addresses(testbed: TestBed) -> None:
    """A server proxy whose MPTCP clients come from 200 addresses: the path metrics'
    `local` values are the server's own addresses, never a client's."""
    cli, srv, l1, l2 = two_paths(testbed, rates=None)
    batch = "".join(f"addr add 10.123.{230 + i // 250}.{1 + i % 250}/32 dev {l1.dev_a}\n"
                    for i in range(CLIENTS))
    cli.run(["ip", "-batch", "-"], input=batch)
    srv.route("10.123.230.0/24", dev=l1.dev_b)
    echo = srv.start([sys.executable, "-c", "import socket\nl = socket.create_server(("
                      "'127.0.0.1', 5201))\nwhile True:\n c, _ = l.accept()\n while d := "
                      "c.recv(65536): c.sendall(d)\n c.close()"], name="echo")
    srv.wait_listening(5201, proc=echo)
    proxy = srv.start([sys.executable, "-m", "mptcpproxy", "-m", "server", "-p", str(PORT),
                       "-r", "127.0.0.1:5201", "--metrics", "127.0.0.1:9541"],
                      name="server-proxy", env=PROXY_ENV)
    srv.wait_listening(PORT, proc=proxy)
    cli.run([sys.executable, "-c", _CLIENT, l1.ip_b, str(CLIENTS)], timeout=60)
    wait_until(lambda: len(conn_ends(proxy)) >= CLIENTS, 20, "the connection-end lines")
    text = _metrics(srv, 9541)
    locals_ = {line.split('local="')[1].split('"')[0] for line in text.splitlines()
               if line.startswith("mptcpproxy_path_") and 'local="' in line}
    assert locals_ and locals_ <= {l1.ip_b, l2.ip_b}, locals_
    received = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith('mptcpproxy_path_bytes_total{direction="received"'))
    assert received >= CLIENTS * 1000, text
    print(json.dumps(sorted(locals_)))
