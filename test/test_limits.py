"""Operations seen from outside (issue 7): the metrics match the traffic, a fallback to TCP
is counted, --idle-timeout, --max-connections, and the drain on SIGTERM (--drain-timeout).

The proxies are processes on loopback inside a private namespace (test_loopback.chain);
the test's own sockets are made in that namespace (Host.connect), so a test can hold
connections open, pace a transfer and signal a proxy in the middle of it.
"""

from __future__ import annotations

import hashlib
import random
import re
import select
import signal
import socket
import sys
import threading
import time

import pytest
from netns import wait_until
from peers import reply_bytes
from test_loopback import CLIENT, PEERS, SERVER, SERVICE, chain, stop_cleanly
from test_metrics import samples, value

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(60)]

CLIENT_METRICS, SERVER_METRICS = 9541, 9542
WAIT = 10.0  # bound of every wait for something the proxies do on their own



# -- helpers ------------------------------------------------------------------------------

def scrape(host, port: int) -> dict:
    """GET /metrics from inside the namespace, as {(sample name, sorted labels): value}."""
    with host.connect(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        head, _, body = read_all(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    return samples(body.decode())


def metric(got: dict, name: str, **labels: str) -> float:
    return value(got, name, **labels)  # summed over the listeners unless one is given


def wait_metric(host, port: int, name: str, value: float, **labels: str) -> dict:
    """Scrape until `name{labels}` reaches `value` (the proxy counts a connection once it
    has seen its end, a moment after the client did); return that scrape."""
    return wait_until(lambda: (got := scrape(host, port))
                      and metric(got, name, **labels) >= value and got,
                      WAIT, f"{name}{labels} >= {value} on :{port}")


def read_all(sock: socket.socket) -> bytes:
    got = bytearray()
    while data := sock.recv(65536):
        got += data
    return bytes(got)


def exchange(sock: socket.socket, payload: bytes) -> bytes:
    """Send `payload`, half-close, read the answer to EOF (small payloads: no deadlock)."""
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    return read_all(sock)


def exchange_one(sock: socket.socket) -> bytes:
    """One byte there and back, without closing: the connection is relayed."""
    sock.sendall(b"x")
    return sock.recv(1)


def ends(proc) -> list[str]:
    """How each connection ended, from the proxy's `conn N REASON: ...` log lines."""
    return re.findall(r"conn \d+ (\w+): client ", proc.stderr)


class PacedEcho:
    """Through an echo: send `count` random chunks of `size` bytes `interval` s apart, then
    half-close; a second thread reads the echo to EOF. The first error is kept."""

    def __init__(self, sock: socket.socket, count: int, size: int, interval: float) -> None:
        self.sock, self.count, self.size, self.interval = sock, count, size, interval
        self.sent, self.received = hashlib.sha256(), hashlib.sha256()
        self.nsent = self.nreceived = 0
        self.error: OSError | None = None
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send), threading.Thread(target=self._recv)]
        for thread in self._threads:
            thread.start()

    def _send(self) -> None:
        rng = random.Random(self.count)
        try:
            for _ in range(self.count):
                data = rng.randbytes(self.size)
                self.sock.sendall(data)
                self.sent.update(data)
                self.nsent += len(data)
                if self._stop.wait(self.interval):
                    return
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.error = self.error or exc

    def _recv(self) -> None:
        try:
            while data := self.sock.recv(65536):
                self.received.update(data)
                self.nreceived += len(data)
        except OSError as exc:
            self.error = self.error or exc

    @property
    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    @property
    def intact(self) -> bool:
        """Every chunk was sent and all of it came back, unchanged."""
        return (self.error is None and self.nsent == self.count * self.size
                and self.received.digest() == self.sent.digest())

    def join(self, timeout: float) -> None:
        """Wait for both threads to end, then close the socket."""
        try:
            wait_until(lambda: not self.running, timeout, "the paced transfer to end")
        finally:
            self._stop.set()
            if self.running:  # stalled: wake the blocked calls (close() would not)
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            for thread in self._threads:
                thread.join(WAIT)
            self.sock.close()


# -- the tests ----------------------------------------------------------------------------

def test_metrics_match_the_traffic(testbed):
    """Requests of known sizes one way, replies of a known size the other: both proxies
    count every connection, the bytes by direction and the MPTCP leg as really MPTCP."""
    reply, sizes = 200_000, [0, 1, 1000, 65_536, 300_000]
    host, server, client = chain(
        testbed, "reply", str(reply),
        server_args=("--metrics", f"127.0.0.1:{SERVER_METRICS}"),
        client_args=("--metrics", f"127.0.0.1:{CLIENT_METRICS}"))
    monitor = host.monitor()
    for size in sizes:
        request = random.Random(size).randbytes(size)
        with host.connect(("127.0.0.1", CLIENT)) as sock:
            assert exchange(sock, request) == reply_bytes(request, reply)
    n = len(sizes)
    # the kernel saw the middle leg as MPTCP (both of its ends are in this namespace)
    assert monitor.wait_for({"CREATED": 2 * n})["CREATED"] == 2 * n
    for port in (CLIENT_METRICS, SERVER_METRICS):
        got = wait_metric(host, port, "mptcpproxy_connections_closed_total", n,
                          reason="closed")
        assert metric(got, "mptcpproxy_connections_accepted_total") == n
        for reason in ("reset", "timeout", "error", "aborted"):
            assert metric(got, "mptcpproxy_connections_closed_total", reason=reason) == 0
        assert metric(got, "mptcpproxy_bytes_total", direction="client_to_upstream") == sum(sizes)
        assert metric(got, "mptcpproxy_bytes_total", direction="upstream_to_client") == n * reply
        assert metric(got, "mptcpproxy_mptcp_leg_connections_total", result="mptcp") == n
        assert metric(got, "mptcpproxy_mptcp_leg_connections_total", result="fallback") == 0
        assert metric(got, "mptcpproxy_mptcp_subflows_count") == n
        assert metric(got, "mptcpproxy_connections_rejected_total") == 0
        assert metric(got, "mptcpproxy_connections_active") == 0
    for proc in (client, server):
        assert stop_cleanly(proc).count("mptcp=yes") == n


def test_fallback_to_tcp_is_counted(testbed):
    """An MPTCP leg whose peer speaks only TCP: a client proxy sent straight to the TCP
    service, and a plain TCP client sent straight to a server proxy. Both work, and both
    count the connection as fallen back to TCP."""
    host, server, client = chain(
        testbed, remote=f"127.0.0.1:{SERVICE}",
        server_args=("--metrics", f"127.0.0.1:{SERVER_METRICS}"),
        client_args=("--metrics", f"127.0.0.1:{CLIENT_METRICS}"))
    payload = random.Random(2).randbytes(100_000)
    for proc, port, metrics in ((client, CLIENT, CLIENT_METRICS),
                                (server, SERVER, SERVER_METRICS)):
        with host.connect(("127.0.0.1", port)) as sock:
            assert exchange(sock, payload) == payload
        got = wait_metric(host, metrics, "mptcpproxy_mptcp_leg_connections_total", 1,
                          result="fallback")
        assert metric(got, "mptcpproxy_mptcp_leg_connections_total", result="mptcp") == 0
        assert metric(got, "mptcpproxy_bytes_total", direction="client_to_upstream") == 100_000
        assert metric(got, "mptcpproxy_mptcp_subflows_count") == 0
        log = stop_cleanly(proc)
        assert "closed: client" in log and "mptcp=no (fell back to TCP)" in log, log


def test_idle_timeout_closes_idle_connections_only(testbed):
    host, _, client = chain(testbed, client_args=(
        "--idle-timeout", "1", "--metrics", f"127.0.0.1:{CLIENT_METRICS}"))
    # busy: one byte every 0.2 s for 3 s, three times the idle timeout
    busy = PacedEcho(host.connect(("127.0.0.1", CLIENT)), count=15, size=1, interval=0.2)
    try:
        with host.connect(("127.0.0.1", CLIENT), timeout=WAIT) as idle:
            assert exchange_one(idle) == b"x"  # relayed, then left alone
            assert idle.recv(16) == b""  # the proxy closed it (a timeout would raise)
        assert busy.running  # still going after the idle one was closed
    finally:
        busy.join(WAIT)
    assert busy.intact, busy.error
    got = wait_metric(host, CLIENT_METRICS, "mptcpproxy_connections_closed_total", 1,
                      reason="closed")
    assert metric(got, "mptcpproxy_connections_closed_total", reason="timeout") == 1
    assert sorted(ends(client)) == ["closed", "timeout"], client.stderr


def test_max_connections_rejects_above_the_limit(testbed):
    host, _, client = chain(testbed, client_args=(
        "--max-connections", "2", "--metrics", f"127.0.0.1:{CLIENT_METRICS}"))
    first = host.connect(("127.0.0.1", CLIENT))
    second = host.connect(("127.0.0.1", CLIENT))
    try:
        assert exchange_one(first) == b"x" and exchange_one(second) == b"x"
        with host.connect(("127.0.0.1", CLIENT), timeout=WAIT) as third:
            try:
                assert third.recv(16) == b""  # closed at once, nothing relayed
            except ConnectionResetError:
                pass
        got = scrape(host, CLIENT_METRICS)
        assert metric(got, "mptcpproxy_connections_rejected_total") == 1
        assert metric(got, "mptcpproxy_connections_accepted_total") == 3
        assert metric(got, "mptcpproxy_connections_active") == 2
        assert "2 connections open (--max-connections)" in client.stderr
        # one ends: once the proxy has seen that, a new connection is served again
        assert exchange(first, b"bye") == b"bye"
        wait_metric(host, CLIENT_METRICS, "mptcpproxy_connections_closed_total", 1,
                    reason="closed")
        with host.connect(("127.0.0.1", CLIENT)) as fourth:
            assert exchange(fourth, b"served") == b"served"
    finally:
        first.close()
        second.close()
    got = scrape(host, CLIENT_METRICS)
    assert metric(got, "mptcpproxy_connections_rejected_total") == 1
    assert metric(got, "mptcpproxy_connections_accepted_total") == 4


def draining(testbed, side: str, drain_timeout: str, seconds: int, size: int):
    """The chain with --drain-timeout on the proxy on `side`, and a transfer through it
    paced to last `seconds`, under way: (host, that proxy, its port, the transfer)."""
    host, server, client = chain(testbed, **{f"{side}_args": ("--drain-timeout", drain_timeout)})
    proxy, port = (client, CLIENT) if side == "client" else (server, SERVER)
    paced = PacedEcho(host.connect(("127.0.0.1", CLIENT)), count=20 * seconds, size=size,
                      interval=0.05)
    try:
        wait_until(lambda: paced.nreceived, WAIT, "the first echoed bytes")
    except BaseException:
        paced.join(WAIT)
        raise
    return host, proxy, port, paced


@pytest.mark.parametrize("side", ["client", "server"])
def test_drain_lets_a_running_transfer_finish(testbed, side):
    # SIGTERM with no other process on the port: the listener stays open while the pairs
    # drain (MPTCP joins of draining connections still arrive there), new connections are
    # reset at once instead of waiting in a backlog nobody serves, and it closes after.
    host, proxy, port, paced = draining(testbed, side, "20", seconds=3, size=65536)
    try:
        proxy.send_signal(signal.SIGTERM)
        wait_until(lambda: "draining 1 open connection(s)" in proxy.stderr, WAIT, "the drain")
        assert paced.running and host.listening(port)
        with pytest.raises(ConnectionResetError):  # at connect() already, or at the first recv
            with host.connect(("127.0.0.1", port)) as probe:
                probe.send(b"hello")
                probe.recv(10)
    finally:
        paced.join(20)
    assert paced.intact, paced.error
    assert proxy.wait(WAIT) == 0, proxy.describe()
    assert not host.listening(port)
    assert ends(proxy) == ["closed"], proxy.stderr


@pytest.mark.parametrize("side", ["client", "server"])
def test_drain_timeout_cuts_a_long_transfer(testbed, side):
    _, proxy, _, paced = draining(testbed, side, "1", seconds=10, size=16384)
    try:
        proxy.send_signal(signal.SIGTERM)
        # exits well before the transfer could have ended by itself
        assert proxy.wait(5) == 0, proxy.describe()
    finally:
        paced.join(WAIT)
    # the stopped proxy reset its connections; the client proxy passes a reset on
    assert not paced.intact
    assert isinstance(paced.error, (ConnectionResetError, BrokenPipeError)), paced.error
    assert "draining 1 open connection(s), for 1 s at most" in proxy.stderr
    assert ends(proxy) == ["aborted"], proxy.stderr


# Both parities of the limit: with an even number of fds free, accept() is what fails; with
# an odd one, accept() succeeds and the upstream socket() is what fails.
@pytest.mark.parametrize(("path", "nofile"), [
    ("fast", 48), ("fast", 49), ("control", 48),
    ("control", 49), ("hostname", 48), ("hostname", 49)])
def test_out_of_fds_pauses_accepting_then_serves_again(testbed, path, nofile):
    # Run out of file descriptors: the connections the proxy holds go on working, the
    # ones beyond wait (in the listen backlog, or accepted and held until an fd is free),
    # the warning comes at most once a second, and once fds are free again every waiting
    # and new client is served. The relay workers accept themselves on the fast path; with
    # a limit, or a name to resolve, the control plane accepts and connects.
    host = testbed.host("lo")
    svc = host.start([sys.executable, PEERS, "echo", str(SERVICE)], name="service")
    host.wait_listening(SERVICE, proc=svc)
    remote = f"localhost:{SERVICE}" if path == "hostname" else f"127.0.0.1:{SERVICE}"
    extra = ("--max-connections", "1000") if path == "control" else ()
    proxy = host.start(["prlimit", f"--nofile={nofile}:{nofile}", sys.executable, "-m",
                        "mptcpproxy", "-m", "client", "-p", str(CLIENT), "-r", remote,
                        "--disable-mptcp", *extra], name="proxy-nofile")
    host.wait_listening(CLIENT, proc=proxy)
    started = time.monotonic()
    socks = [host.connect(("127.0.0.1", CLIENT)) for _ in range(30)]
    try:
        for sock in socks:
            sock.sendall(b"x")
        answered = set()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and len(answered) < len(socks):
            ready, _, _ = select.select([s for s in socks if s not in answered], [], [], 0.2)
            for sock in ready:
                assert sock.recv(1) == b"x"
                answered.add(sock)
        assert 0 < len(answered) < len(socks), "the fd limit did not bite"
        assert proxy.poll() is None, proxy.describe()
        waiting = [s for s in socks if s not in answered]
        for sock in answered:  # free the proxy's fds: the waiting clients get their turn
            sock.close()
        for sock in waiting:
            sock.settimeout(WAIT)
            assert sock.recv(1) == b"x", proxy.stderr[-2000:]
    finally:
        for sock in socks:
            sock.close()
    with host.connect(("127.0.0.1", CLIENT)) as late:
        late.settimeout(WAIT)
        assert exchange(late, b"late") == b"late"
    warnings = proxy.stderr.lower().count("too many open files")
    assert 1 <= warnings <= time.monotonic() - started + 2, proxy.stderr[-2000:]
    stop_cleanly(proxy)
