"""The relay engine on socketpairs and loopback TCP pairs, for both engines (ids c / py)."""

from __future__ import annotations

import hashlib
import os
import random
import resource
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest

MiB = 1 << 20
TIMEOUT = 30


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected loopback TCP sockets (a reset exists on TCP, not on AF_UNIX)."""
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        a = socket.create_connection(lsock.getsockname(), timeout=TIMEOUT)
        b, _ = lsock.accept()
    b.settimeout(TIMEOUT)
    return a, b


class Chain:
    """left <-> relay <-> right: the test holds `left` and `right`, the relay the middle."""

    def __init__(self, relay, make=socket.socketpair, conn_id: int = 1) -> None:
        self.left, mid_a = make()
        mid_b, self.right = make()
        for s in (self.left, self.right):
            s.settimeout(TIMEOUT)
        relay.add(mid_a.detach(), mid_b.detach(), conn_id)

    def close(self) -> None:
        self.left.close()
        self.right.close()


def wait_results(relay, n: int = 1, timeout: float = TIMEOUT) -> list:
    results, deadline = [], time.monotonic() + timeout
    while len(results) < n and time.monotonic() < deadline:
        results += relay.collect()
        time.sleep(0.01)
    assert len(results) >= n, f"only {len(results)} of {n} pairs reported their end"
    return results


def stream(seed: int, size: int, chunk: int = MiB):
    rnd = random.Random(seed)
    while size > 0:
        n = min(chunk, size)
        yield rnd.randbytes(n)
        size -= n


def send_all(sock: socket.socket, seed: int, size: int, digest: list) -> None:
    h = hashlib.sha256()
    for block in stream(seed, size):
        sock.sendall(block)
        h.update(block)
    sock.shutdown(socket.SHUT_WR)
    digest.append(h.hexdigest())


def recv_all(sock: socket.socket, out: list) -> None:
    h, n = hashlib.sha256(), 0
    while data := sock.recv(256 * 1024):
        h.update(data)
        n += len(data)
    out.append((n, h.hexdigest()))


def run_threads(*targets) -> None:
    threads = [threading.Thread(target=f, args=a, daemon=True) for f, *a in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 4)
        assert not t.is_alive(), "a transfer did not finish"


def test_compiled_extension_loaded():
    # The suite must exercise the C engine: a silent fallback to the twin is a failure.
    from mptcpproxy import relay
    from mptcpproxy.relay import _relay

    assert relay.ENGINE == "c"
    assert relay.Relay is _relay.Relay


def assert_both_ways_intact(relay, chain: Chain, size: int) -> None:
    """`size` random bytes each way at once, then EOF: all arrive in order, and the relay
    reports the pair closed with those byte counts."""
    sent_l, sent_r, got_l, got_r = [], [], [], []
    run_threads(
        (send_all, chain.left, 1, size, sent_l),
        (send_all, chain.right, 2, size, sent_r),
        (recv_all, chain.right, got_r),
        (recv_all, chain.left, got_l),
    )
    assert got_r == [(size, sent_l[0])]
    assert got_l == [(size, sent_r[0])]
    (result,) = wait_results(relay)
    assert (result.reason, result.bytes_ab, result.bytes_ba) == ("closed", size, size)


def test_bulk_256mib_each_way_intact(engine):
    relay = engine(workers=2)
    chain = Chain(relay)
    try:
        assert_both_ways_intact(relay, chain, 256 * MiB)
    finally:
        chain.close()
        relay.close()


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def send_until_blocked(sock: socket.socket) -> tuple[int, str]:
    """Send to a peer that reads nothing until a send blocks for 0.5 s; the bytes sent and
    their sha256. Fails if the sender was never slowed down."""
    block = random.Random(3).randbytes(MiB)
    sock.settimeout(0.5)
    sent, h = 0, hashlib.sha256()
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and sent < 256 * MiB:
        try:
            n = sock.send(block)
        except TimeoutError:
            break
        h.update(block[:n])
        sent += n
    sock.settimeout(TIMEOUT)
    assert sent < 64 * MiB, "the sender was never slowed down"
    return sent, h.hexdigest()


def assert_arrives_after_eof(chain: Chain, sent: int, digest: str) -> None:
    """EOF from the left; the right, reading now, gets every byte sent, in order."""
    chain.left.shutdown(socket.SHUT_WR)
    got = []
    recv_all(chain.right, got)
    assert got == [(sent, digest)]


def test_peer_that_does_not_read_bounds_memory(engine):
    relay = engine(workers=1, bufsize=64 * 1024)
    chain = Chain(relay)
    base = _rss()
    try:
        # The right side reads nothing: once the kernel buffers and the relay's one
        # pending chunk are full, the sender blocks instead of the proxy growing.
        sent, digest = send_until_blocked(chain.left)
        time.sleep(0.3)
        assert _rss() - base < 16 * MiB
        assert_arrives_after_eof(chain, sent, digest)
    finally:
        chain.close()
        relay.close()
    assert wait_results(relay)[0].bytes_ab == sent


@pytest.mark.parametrize("first", ["left", "right"])
def test_half_close_keeps_the_other_direction(engine, first):
    relay = engine()
    chain = Chain(relay)
    asker, answerer = (chain.left, chain.right) if first == "left" else (chain.right, chain.left)
    try:
        asker.sendall(b"request")
        asker.shutdown(socket.SHUT_WR)  # the asker is done talking, not listening
        got = b""
        while data := answerer.recv(100):
            got += data
        assert got == b"request"  # EOF passed on after the bytes
        sent, received = [], []
        run_threads((send_all, answerer, 4, 3 * MiB, sent), (recv_all, asker, received))
        assert received == [(3 * MiB, sent[0])]
        (result,) = wait_results(relay)
        assert result.reason == "closed"
    finally:
        chain.close()
        relay.close()


def test_reset_is_passed_on_as_reset(engine):
    relay = engine()
    chain = Chain(relay, make=tcp_pair)
    try:
        chain.left.sendall(b"x" * 1000)
        assert chain.right.recv(1000)
        chain.left.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        chain.left.close()  # RST
        with pytest.raises(ConnectionResetError):
            while chain.right.recv(1000):
                pass
        (result,) = wait_results(relay)
        assert result.reason == "reset"
    finally:
        chain.close()
        relay.close()


EPIPE_SCRIPT = textwrap.dedent("""
    import signal, socket, sys, time
    sys.path.insert(0, sys.argv[2])
    from test_relay import Chain, tcp_pair, wait_results
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # a send without MSG_NOSIGNAL would kill us
    if sys.argv[1] == "c":
        from mptcpproxy.relay._relay import Relay
    else:
        from mptcpproxy.relay._relay_py import Relay
    relay = Relay(splice=sys.argv[3] == "splice")  # splice(): the sends are splice() calls
    chain = Chain(relay, make=tcp_pair)
    chain.right.close()  # gone: the relay's next sends toward it fail
    try:
        for _ in range(200):
            chain.left.sendall(b"y" * 262144, socket.MSG_NOSIGNAL)  # only the relay is on trial
            time.sleep(0.005)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the failure was passed back to the sender
    print(wait_results(relay)[0].reason)
    relay.close()
""")


@pytest.mark.parametrize("how", ["copy", "splice"])
def test_epipe_does_not_raise_sigpipe(engine, how):
    name = "c" if engine.__module__ == "mptcpproxy.relay._relay" else "py"
    proc = subprocess.run(
        [sys.executable, "-c", EPIPE_SCRIPT, name, os.path.dirname(__file__), how],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "reset"


def test_500_pairs_at_once(engine):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    relay = engine(workers=2)
    rnd = random.Random(5)
    chains = [Chain(relay, conn_id=i) for i in range(500)]
    payloads = [(rnd.randbytes(rnd.randrange(1, 32768)), rnd.randbytes(rnd.randrange(1, 32768)))
                for _ in chains]
    try:
        for chain, (up, down) in zip(chains, payloads, strict=True):
            chain.left.sendall(up)
            chain.left.shutdown(socket.SHUT_WR)
            chain.right.sendall(down)
            chain.right.shutdown(socket.SHUT_WR)
        for chain, (up, down) in zip(chains, payloads, strict=True):
            for sock, want in ((chain.right, up), (chain.left, down)):
                got = []
                recv_all(sock, got)
                assert got == [(len(want), hashlib.sha256(want).hexdigest())]
        results = wait_results(relay, 500)
        assert sorted(r.conn_id for r in results) == list(range(500))
        assert {r.reason for r in results} == {"closed"}
        assert relay.active == 0
    finally:
        for chain in chains:
            chain.close()
        relay.close()


def test_idle_timeout_closes_idle_pair_not_busy_one(engine):
    relay = engine(idle_timeout=0.5)
    idle, busy = Chain(relay, conn_id=1), Chain(relay, conn_id=2)
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # keep one pair busy past the timeout
            busy.left.sendall(b"ping")
            assert busy.right.recv(100)
            time.sleep(0.05)
        results = relay.collect()
        assert [(r.conn_id, r.reason) for r in results] == [(1, "timeout")]
        assert idle.left.recv(10) == b""  # the idle peer saw the connection closed
        busy.left.sendall(b"still here")
        assert busy.right.recv(100) == b"still here"
    finally:
        idle.close()
        busy.close()
        relay.close()


def test_close_aborts_open_pairs(engine):
    relay = engine()
    chain = Chain(relay, make=tcp_pair, conn_id=9)
    try:
        relay.close()
        (result,) = relay.collect()
        assert (result.conn_id, result.reason) == (9, "aborted")
        with pytest.raises(ConnectionResetError):
            chain.left.recv(10)
    finally:
        chain.close()


def test_pairs_reset_mid_transfer_leave_the_others_intact(engine):
    # Churn: pairs come and go, a third of them cut by a reset in the middle of a bulk
    # transfer, while the others' bytes must arrive whole and in order.
    relay = engine(workers=2, bufsize=65536)
    corrupted: list[tuple[int, int, int]] = []

    def one(i: int) -> None:
        chain = Chain(relay, make=tcp_pair, conn_id=i)
        rnd = random.Random(i)
        data = rnd.randbytes(rnd.randrange(MiB, 4 * MiB))
        cut = i % 3 == 0

        def send() -> None:
            try:
                for k in range(0, len(data), 256 * 1024):
                    chain.left.sendall(data[k:k + 256 * 1024])
                    if cut and k > len(data) // 3:
                        chain.left.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                              struct.pack("ii", 1, 0))
                        chain.left.close()
                        return
                chain.left.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the cut pair's sender may see its own reset

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        h, n = hashlib.sha256(), 0
        try:
            while got := chain.right.recv(65536):
                h.update(got)
                n += len(got)
        except ConnectionResetError:
            pass
        sender.join(TIMEOUT)
        if not cut and (n, h.digest()) != (len(data), hashlib.sha256(data).digest()):
            corrupted.append((i, n, len(data)))
        chain.close()

    threads: list[threading.Thread] = []
    try:
        for i in range(150):
            thread = threading.Thread(target=one, args=(i,), daemon=True)
            thread.start()
            threads.append(thread)
            if len(threads) >= 12:
                threads.pop(0).join(TIMEOUT)
        for thread in threads:
            thread.join(TIMEOUT)
        assert not any(t.is_alive() for t in threads), "a transfer hung"
        assert corrupted == []
    finally:
        relay.close()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def test_busy_poll_relays_and_stops_polling_once_idle(engine):
    # --busy-poll: the worker polls on without sleeping for a while after each event,
    # never longer: an idle proxy must not keep a CPU busy.
    relay = engine(workers=1, busy_poll=0.05)
    chain = Chain(relay, tcp_pair)
    try:
        for i in range(200):
            chain.left.sendall(b"q%d" % i)
            assert chain.right.recv(100) == b"q%d" % i
            chain.right.sendall(b"a%d" % i)
            assert chain.left.recv(100) == b"a%d" % i
        time.sleep(0.2)  # past the 50 ms of polling after the last event
        before = _cpu_seconds()
        time.sleep(1.0)
        assert _cpu_seconds() - before < 0.2, "the relay kept polling while idle"
    finally:
        chain.close()
        relay.close()
