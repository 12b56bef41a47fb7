"""Relay(splice=True): bulk halves go through a pipe with splice(), small ones are copied.
For both engines (ids c / py), on loopback TCP pairs and socketpairs."""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import threading
import time

import pytest
from test_relay import (
    Chain,
    MiB,
    assert_arrives_after_eof,
    assert_both_ways_intact,
    run_threads,
    send_until_blocked,
    stream,
    tcp_pair,
    wait_results,
)


def pipes_open() -> int:
    n = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if stat.S_ISFIFO(os.stat(f"/proc/self/fd/{name}").st_mode):
                n += 1
        except OSError:
            pass  # the listing's own fd, or one closed meanwhile
    return n


class PipeWatch:
    """The most pipe fds this process held while the block ran (sampled every ms)."""

    def __init__(self) -> None:
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.most = max(self.most, pipes_open())
            time.sleep(0.001)

    def __enter__(self) -> PipeWatch:
        self.base = pipes_open()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.most -= self.base


@pytest.mark.parametrize("make", [tcp_pair, socket.socketpair], ids=["tcp", "unix"])
def test_bulk_each_way_is_spliced_and_intact(engine, make):
    relay = engine(workers=2, bufsize=512 * 1024, splice=True)
    chain = Chain(relay, make)
    try:
        with PipeWatch() as watch:
            assert_both_ways_intact(relay, chain, 128 * MiB)
        assert watch.most >= 2, "no pipe was used: nothing was spliced"
    finally:
        chain.close()
        relay.close()


def test_small_messages_are_copied_not_spliced(engine):
    relay = engine(splice=True)
    chain = Chain(relay, tcp_pair)
    try:
        with PipeWatch() as watch:
            for i in range(200):
                chain.left.sendall(b"%d" % i)
                assert chain.right.recv(100) == b"%d" % i
                chain.right.sendall(b"ok")
                assert chain.left.recv(100) == b"ok"
        assert watch.most == 0
    finally:
        chain.close()
        relay.close()


def test_bulk_then_ping_pong_then_bulk_keeps_order(engine):
    # Each half moves from copying to splicing and back; no byte may overtake another.
    relay = engine(workers=1, bufsize=256 * 1024, splice=True)
    chain = Chain(relay, tcp_pair)
    try:
        for round_ in range(3):
            sent, got = [], []
            run_threads((send_stream, chain.left, 10 + round_, 24 * MiB, sent),
                        (recv_exactly, chain.right, 24 * MiB, got))
            assert got == [(24 * MiB, sent[0])]
            for i in range(20):
                chain.right.sendall(b"pong%d" % i)
                assert recv_n(chain.left, len(b"pong%d" % i)) == b"pong%d" % i
        chain.left.shutdown(socket.SHUT_WR)
        assert chain.right.recv(1) == b""
        chain.right.close()
        (result,) = wait_results(relay)
        assert result.reason == "closed"
        assert result.bytes_ab == 3 * 24 * MiB
    finally:
        chain.close()
        relay.close()


def test_peer_that_does_not_read_stops_the_sender_then_gets_everything(engine):
    relay = engine(workers=1, bufsize=64 * 1024, splice=True)
    chain = Chain(relay, tcp_pair)
    try:
        sent, digest = send_until_blocked(chain.left)
        assert_arrives_after_eof(chain, sent, digest)
    finally:
        chain.close()
        relay.close()


def test_reset_during_a_spliced_transfer_is_passed_on(engine):
    relay = engine(workers=1, splice=True)
    chain = Chain(relay, tcp_pair)
    try:
        for _ in range(8):
            chain.left.sendall(os.urandom(MiB))
        # Abortive close of the sender while bytes are in flight.
        chain.left.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        chain.left.close()
        with pytest.raises(ConnectionResetError):
            while chain.right.recv(MiB):
                pass
        (result,) = wait_results(relay)
        assert result.reason == "reset"
    finally:
        chain.right.close()
        relay.close()


def send_stream(sock: socket.socket, seed: int, size: int, digest: list) -> None:
    h = hashlib.sha256()
    for block in stream(seed, size):
        sock.sendall(block)
        h.update(block)
    digest.append(h.hexdigest())


def recv_n(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        data = sock.recv(n - len(out))
        assert data, "EOF too early"
        out += data
    return out


def recv_exactly(sock: socket.socket, size: int, out: list) -> None:
    h, got = hashlib.sha256(), 0
    while got < size:
        data = sock.recv(min(MiB, size - got))
        assert data, "EOF too early"
        h.update(data)
        got += len(data)
    out.append((got, h.hexdigest()))


def blocking_tcp_pair() -> tuple[socket.socket, socket.socket]:
    """As tcp_pair, in blocking mode (as a caller of Relay.add may hand them over)."""
    a, b = tcp_pair()
    a.setblocking(True)
    b.setblocking(True)
    return a, b


def test_a_stalled_receiver_does_not_hold_up_other_pairs(engine):
    # The relay's sockets must not block: a splice() toward a receiver that reads nothing
    # would otherwise hang the worker thread and every pair on it.
    relay = engine(workers=1, splice=True)
    stalled, lively = Chain(relay, blocking_tcp_pair, 1), Chain(relay, blocking_tcp_pair, 2)
    try:
        sent, digest = send_until_blocked(stalled.left)
        for sock in (lively.left, lively.right):
            sock.settimeout(5)
        for i in range(20):
            lively.left.sendall(b"ping%d" % i)
            assert recv_n(lively.right, len(b"ping%d" % i)) == b"ping%d" % i
        assert_arrives_after_eof(stalled, sent, digest)
    finally:
        stalled.close()
        lively.close()
        relay.close()
