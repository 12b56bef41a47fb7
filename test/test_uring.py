"""The experimental io_uring engine (mptcpproxy.relay._uring, issue 16) relaying loopback
TCP (and MPTCP upstream) connections: bytes intact both ways, half-close, refused upstreams,
many connections, stop() with pairs open, and no fd left behind (the autouse fixture)."""

from __future__ import annotations

import errno
import hashlib
import socket
import struct
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from mptcpproxy.relay import _uring

WHY_NOT = _uring.probe()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")

TIMEOUT = 30
MiB = 1 << 20
IPPROTO_MPTCP = 262


def blob(seed: int, size: int) -> bytes:
    return hashlib.shake_256(seed.to_bytes(8, "little")).digest(size)


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


class Upstream:
    """A threaded server: `handler(conn)` for every connection it accepts."""

    def __init__(self, handler, proto: int = socket.IPPROTO_TCP) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.handler, self.threads = handler, []
        self.errors: list[BaseException] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(TIMEOUT)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                self.handler(conn)
            except OSError as exc:
                self.errors.append(exc)

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()

    def close(self) -> None:
        if self.sock.fileno() < 0:
            return  # closed already
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.acceptor.join(TIMEOUT)
        for t in self.threads:
            t.join(TIMEOUT)


@pytest.fixture
def relay_to():
    """relay_to(upstream, mptcp=False) -> (the proxy's address, its Uring); stopped and
    closed after the test."""
    made = []

    def make(upstream: Upstream, mptcp: bool = False) -> tuple[tuple[str, int], _uring.Uring]:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(256)
        relay = _uring.Uring(listener, upstream.address, mptcp=mptcp, workers=2)
        relay.start()
        made.append((relay, listener, upstream))
        return listener.getsockname(), relay

    yield make
    for relay, listener, upstream in made:
        relay.stop()
        listener.close()
        upstream.close()
        assert not upstream.errors, upstream.errors


def finished(relay: _uring.Uring, n: int) -> list[tuple]:
    """The records of the first `n` pairs that ended (waits up to TIMEOUT for them)."""
    pause = threading.Event()
    for _ in range(TIMEOUT * 100):
        if len(relay.results) >= n:
            break
        relay.collect()
        pause.wait(0.01)
    return relay.results


def exchange(sock: socket.socket, data: bytes) -> bytes:
    """Sends `data` then EOF while reading everything the other end sends, to its EOF."""
    sender = threading.Thread(target=lambda: (sock.sendall(data), sock.shutdown(socket.SHUT_WR)))
    sender.start()
    got = recv_all(sock)
    sender.join(TIMEOUT)
    return got


def test_bytes_intact_both_ways_at_once(relay_to):
    """8 MiB up and 6 MiB down at the same time: the same sha256 at each end, and the
    pair's record counts them."""
    def both_ways(conn: socket.socket) -> None:
        got = exchange(conn, blob(2, 6 * MiB))
        assert hashlib.sha256(got).digest() == hashlib.sha256(blob(1, 8 * MiB)).digest()

    addr, relay = relay_to(Upstream(both_ways))
    with socket.create_connection(addr, timeout=TIMEOUT) as c:
        got = exchange(c, blob(1, 8 * MiB))
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(blob(2, 6 * MiB)).hexdigest()
    assert finished(relay, 1) == [(8 * MiB, 6 * MiB, "closed", 0)]


def test_half_close_client_first(relay_to):
    """The client's EOF reaches the server, which answers only after it."""
    upstream = Upstream(lambda conn: conn.sendall(hashlib.sha256(recv_all(conn)).digest()))
    addr, _ = relay_to(upstream)
    with socket.create_connection(addr, timeout=TIMEOUT) as c:
        c.sendall(blob(3, MiB))
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c) == hashlib.sha256(blob(3, MiB)).digest()


def test_half_close_server_first(relay_to):
    """The server ends its side first; the client reads that EOF, still sends, and the
    server gets every byte of it."""
    late = []

    def speak_first(conn: socket.socket) -> None:
        assert conn.recv(5, socket.MSG_WAITALL) == b"hello"
        conn.sendall(b"bye")
        conn.shutdown(socket.SHUT_WR)
        late.append(recv_all(conn))

    upstream = Upstream(speak_first)
    addr, _ = relay_to(upstream)
    with socket.create_connection(addr, timeout=TIMEOUT) as c:
        c.sendall(b"hello")
        assert recv_all(c) == b"bye"
        c.sendall(blob(4, MiB))
        c.shutdown(socket.SHUT_WR)
        assert c.recv(1) == b""  # the pair closes once both directions ended
    upstream.close()
    assert late == [blob(4, MiB)]


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def test_many_connections_and_their_records():
    """400 connections, 32 at a time, each echoing 1-4 KiB: every one intact, and every
    pair's record says closed with its byte counts."""
    upstream = Upstream(echo)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(256)
    relay = _uring.Uring(listener, upstream.address, workers=2)
    relay.start()

    def one(i: int) -> int:
        data = blob(i, 1024 + i * 7 % 3072)
        with socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as c:
            c.sendall(data)
            c.shutdown(socket.SHUT_WR)
            assert recv_all(c) == data
        return len(data)

    try:
        with ThreadPoolExecutor(32) as pool:
            sizes = sorted(pool.map(one, range(400)))
        records = finished(relay, 400)
    finally:
        relay.stop()
        listener.close()
        upstream.close()
    assert len(records) == 400
    assert Counter(r[2] for r in records) == {"closed": 400}
    assert sorted(r[0] for r in records) == sizes
    assert sorted(r[1] for r in records) == sizes
    assert relay.counters[:2] == (400, 400)


def test_refused_upstream_closes_the_client():
    """Nothing listens upstream: the client sees its connection closed, the record says
    failed with ECONNREFUSED."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    relay = _uring.Uring(listener, dead, workers=1)
    relay.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as c:
            assert c.recv(10) == b""
        records = finished(relay, 1)
    finally:
        relay.stop()
        listener.close()
    assert records == [(0, 0, "failed", 111)]


def test_upstream_reset_mid_transfer(relay_to):
    """The server resets the connection while the client is still sending: the relay's
    send fails, the pair ends as an error (ECONNRESET or EPIPE) and the client's
    connection ends too."""
    def reset_early(conn: socket.socket) -> None:
        conn.recv(1024)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    addr, relay = relay_to(Upstream(reset_early))
    with socket.create_connection(addr, timeout=TIMEOUT) as c:
        try:
            c.sendall(blob(6, 32 * MiB))
            assert c.recv(10) == b""
        except (ConnectionResetError, BrokenPipeError):
            pass
    [(up, down, reason, err)] = finished(relay, 1)
    assert (reason, down) == ("error", 0)
    assert err in (errno.ECONNRESET, errno.EPIPE)
    assert up >= 1024


def test_stop_closes_open_pairs():
    """stop() with 20 idle pairs and one mid-transfer: every client and server socket sees
    its connection end, every pair is recorded as stopped, no fd stays open."""
    held = []
    upstream = Upstream(lambda conn: held.append(recv_all(conn)))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    relay = _uring.Uring(listener, upstream.address, workers=2)
    relay.start()
    clients = [socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
               for _ in range(20)]
    try:
        clients[0].sendall(b"x" * 1000)
        for _ in range(TIMEOUT * 100):  # every upstream connection made
            if len(upstream.threads) == 20:
                break
            threading.Event().wait(0.01)
        relay.stop()
        for c in clients:
            assert c.recv(10) == b""
    finally:
        for c in clients:
            c.close()
        listener.close()
        upstream.close()
    assert Counter(r[2] for r in relay.results) == {"stopped": 20}
    assert len(held) == 20


def _mptcp_works() -> bool:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP).close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _mptcp_works(), reason="this kernel has no MPTCP sockets")
def test_mptcp_upstream(relay_to):
    """An MPTCP upstream (the client side of a pair): bytes intact, and the upstream's
    accepted socket is MPTCP."""
    seen = []

    def check(conn: socket.socket) -> None:
        seen.append(conn.getsockopt(socket.SOL_TCP, 43))  # TCP_IS_MPTCP
        echo(conn)

    addr, _ = relay_to(Upstream(check, IPPROTO_MPTCP), mptcp=True)
    data = blob(5, 2 * MiB)
    with socket.create_connection(addr, timeout=TIMEOUT) as c:
        got = exchange(c, data)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert seen == [1]
