"""Relay.listen: the workers accept and connect upstream themselves (the fast path for a
fixed upstream), for both engines (ids c / py)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import socket
import threading
import time

from test_relay import TIMEOUT, MiB, recv_all, wait_results


class Upstream:
    """A loopback server that reads each request to EOF, then replies with `size` bytes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.addr = self.sock.getsockname()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        reply = random.Random(8).randbytes(self.size)
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(TIMEOUT)
                while conn.recv(65536):
                    pass
                conn.sendall(reply)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(TIMEOUT)


def listening_relay(engine, upstream_addr: tuple, connect_timeout: float = 5.0):
    relay = engine(workers=2)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(64)
    lsock.setblocking(False)
    relay.listen(lsock.fileno(), socket.AF_INET, upstream_addr, False, -1, 0, connect_timeout)
    return relay, lsock


def test_listen_accepts_connects_and_relays(engine):
    upstream = Upstream(4 * MiB)
    relay, lsock = listening_relay(engine, upstream.addr)
    try:
        for _ in range(5):
            # The request and its EOF arrive before the upstream is even connected.
            with socket.create_connection(lsock.getsockname(), timeout=TIMEOUT) as client:
                client.sendall(b"q" * 1000)
                client.shutdown(socket.SHUT_WR)
                got = []
                recv_all(client, got)
                reply = random.Random(8).randbytes(4 * MiB)
                assert got == [(len(reply), hashlib.sha256(reply).hexdigest())]
                port = client.getsockname()[1]
            results = wait_results(relay)
            assert [(r.reason, r.bytes_ab, r.bytes_ba, r.client) for r in results] == [
                ("closed", 1000, 4 * MiB, ("127.0.0.1", port))]
        assert sum(s.accepted for s in relay.stats()) == 5
    finally:
        relay.unlisten()
        deadline = time.monotonic() + TIMEOUT
        while relay.listening and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not relay.listening
        relay.close()
        lsock.close()
        upstream.close()


def sockets_of_this_process() -> list[socket.socket]:
    """Duplicates of every TCP socket this process holds (the caller closes them)."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = os.dup(int(name))
        except OSError:
            continue  # the listing's own fd, gone
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)  # not a socket
            continue
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
            out.append(sock)
        else:
            sock.detach()
    return out


def test_listen_sets_nodelay_on_both_legs(engine):
    # A relay must not add Nagle's delay to small writes: both of its sockets of a pair
    # (the accepted one and the upstream one) have TCP_NODELAY.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        relay, lsock = listening_relay(engine, server.getsockname())
        try:
            with socket.create_connection(lsock.getsockname(), timeout=TIMEOUT) as client:
                client.sendall(b"x")
                conn, _ = server.accept()
                with conn:
                    conn.settimeout(TIMEOUT)
                    assert conn.recv(1) == b"x"
                    legs = {}
                    for sock in sockets_of_this_process():
                        with sock:
                            try:
                                peer = sock.getpeername()
                            except OSError:
                                continue  # a listener
                            if peer == client.getsockname():
                                legs["client"] = sock.getsockopt(socket.IPPROTO_TCP,
                                                                 socket.TCP_NODELAY)
                            elif peer == server.getsockname():
                                legs["upstream"] = sock.getsockopt(socket.IPPROTO_TCP,
                                                                   socket.TCP_NODELAY)
                    assert legs == {"client": 1, "upstream": 1}
        finally:
            relay.close()
            lsock.close()


def test_listen_reports_an_unreachable_upstream(engine):
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        refused_addr = closed.getsockname()
    relay, lsock = listening_relay(engine, refused_addr)
    try:
        with socket.create_connection(lsock.getsockname(), timeout=TIMEOUT) as client:
            assert client.recv(10) == b""  # closed at once, no byte
        (result,) = wait_results(relay)
        assert (result.reason, result.errno) == ("failed", errno.ECONNREFUSED)
    finally:
        relay.close()
        lsock.close()


@contextlib.contextmanager
def silent_upstream():
    """The address of a listener that never accepts, its backlog full: SYNs are dropped."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(0)
        filler = [socket.socket() for _ in range(3)]
        try:
            for f in filler:
                f.setblocking(False)
                f.connect_ex(silent.getsockname())
            yield silent.getsockname()
        finally:
            for f in filler:
                f.close()


def test_listen_gives_up_after_the_connect_timeout(engine):
    with silent_upstream() as addr:
        relay, lsock = listening_relay(engine, addr, connect_timeout=0.5)
        try:
            with socket.create_connection(lsock.getsockname(), timeout=TIMEOUT) as client:
                assert client.recv(10) == b""
            (result,) = wait_results(relay)
            assert (result.reason, result.errno) == ("failed", errno.ETIMEDOUT)
        finally:
            relay.close()
            lsock.close()
