"""Engine defects found under real operations (issue 11), for both engines (ids c / py):
fds leave the epoll set before they are closed, a timed-out pair holding bytes is reset,
connect failures are never closed connections, Relay.add owns its fds, EINTR is retried,
the active count never wraps."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from netns import wait_until
from test_relay import TIMEOUT, Chain, MiB, tcp_pair, wait_results
from test_relay_listen import listening_relay, silent_upstream

HERE = os.path.dirname(os.path.abspath(__file__))


def epoll_watches(inode: int) -> list[str]:
    """The epoll registrations in this process that point at the open file `inode`
    (/proc/self/fdinfo of every eventpoll fd lists its targets: `tfd: N ... ino:HEX`)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[eventpoll]":
                continue
            with open(f"/proc/self/fdinfo/{fd}") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith("tfd:") and f" ino:{inode:x} " in line + " ":
                found.append(f"epoll fd {fd}: {line}")
    return found


def pair_with_a_dup(relay) -> tuple[socket.socket, socket.socket, int]:
    """left <-> relay <-> right over TCP, and a dup of the relay's fd toward `right`: its
    open file outlives the pair (as in a child between fork and exec)."""
    left, mid_a = tcp_pair()
    mid_b, right = tcp_pair()
    dup = os.dup(mid_b.fileno())
    relay.add(mid_a.detach(), mid_b.detach(), 1)
    return left, right, dup


def test_a_closed_pair_leaves_the_epoll_set(engine):
    # finish() closed the fds without EPOLL_CTL_DEL: an open file that outlives the fd
    # (a dup, a child between fork and exec) stayed registered with a pointer to the
    # freed pair.
    relay = engine()
    left, right, dup = pair_with_a_dup(relay)
    try:
        left.close()
        assert right.recv(10) == b""
        right.close()
        (result,) = wait_results(relay)
        assert result.reason == "closed"
        inode = os.fstat(dup).st_ino
        deadline = time.monotonic() + 2
        while epoll_watches(inode) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not epoll_watches(inode), "the closed pair's socket is still in an epoll set"
    finally:
        os.close(dup)
        relay.close()


def test_events_on_a_duplicated_fd_after_the_pair_ended(engine):
    # The reproduction of the use-after-free (under AddressSanitizer it is reported at
    # once): a dup keeps one socket alive after a reset ended the pair, then its peer
    # sends. The relay must go on serving other pairs, their bytes intact.
    relay = engine()
    left, right, dup = pair_with_a_dup(relay)
    try:
        left.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        left.close()  # a reset: the pair ends at once
        (result,) = wait_results(relay)
        assert result.reason == "reset"
        for _ in range(20):  # events on the open file the dup keeps
            right.send(b"x" * 1000)
            time.sleep(0.005)
        chain = Chain(relay, make=tcp_pair, conn_id=2)
        try:
            chain.left.sendall(b"still relaying")
            assert chain.right.recv(100) == b"still relaying"
        finally:
            chain.close()
    finally:
        os.close(dup)
        right.close()
        relay.close()


def _fill_until_blocked(sock: socket.socket) -> int:
    sock.setblocking(False)
    sent, block = 0, b"\xa5" * (256 * 1024)
    deadline = time.monotonic() + TIMEOUT
    idle_since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - idle_since < 0.2:
        try:
            sent += sock.send(block)
            idle_since = time.monotonic()
        except BlockingIOError:
            time.sleep(0.01)
    sock.setblocking(True)
    return sent


def test_idle_timeout_with_bytes_held_resets_both_peers(engine):
    # 8 MB sent, 3.9 MB received, then a clean EOF: the receiver could not tell it lost
    # data. A pair that times out while the relay holds bytes is reset both ways.
    relay = engine(bufsize=256 * 1024, idle_timeout=1.0)
    chain = Chain(relay, make=tcp_pair)
    try:
        sent = _fill_until_blocked(chain.left)  # the right reads nothing: bytes pile up
        assert sent > 0
        (result,) = wait_results(relay)
        assert result.reason == "timeout"
        got = 0
        with pytest.raises(ConnectionResetError):
            while data := chain.right.recv(MiB):
                got += len(data)
        assert got < sent
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            for _ in range(100):
                chain.left.send(b"more")
                time.sleep(0.01)
    finally:
        chain.close()
        relay.close()


def test_idle_timeout_with_nothing_held_ends_with_fin(engine):
    relay = engine(idle_timeout=0.3)
    chain = Chain(relay, make=tcp_pair)
    try:
        chain.left.sendall(b"hello")
        assert chain.right.recv(10) == b"hello"
        (result,) = wait_results(relay)
        assert result.reason == "timeout"
        assert chain.right.recv(10) == b""  # a clean end: every byte was delivered
        assert chain.left.recv(10) == b""
    finally:
        chain.close()
        relay.close()


def _refused_addr() -> tuple:
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        return closed.getsockname()


def test_a_refused_mptcp_connect_is_not_reported_as_mptcp(engine):
    relay = engine(workers=1)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    lsock.setblocking(False)
    relay.listen(lsock.fileno(), socket.AF_INET, _refused_addr(), True, 1, 0, 5.0)
    try:
        with socket.create_connection(lsock.getsockname(), timeout=TIMEOUT) as client:
            assert client.recv(10) == b""
        (result,) = wait_results(relay)
        assert (result.reason, result.errno) == ("failed", errno.ECONNREFUSED)
        assert (result.is_mptcp, result.subflows, result.bytes_ab, result.bytes_ba) == (
            False, 0, 0, 0)
    finally:
        relay.close()
        lsock.close()


def test_a_pair_still_connecting_at_close_is_a_failed_connect(engine):
    with silent_upstream() as addr:
        relay, lsock = listening_relay(engine, addr, connect_timeout=60)
        try:
            client = socket.create_connection(lsock.getsockname(), timeout=TIMEOUT)
            deadline = time.monotonic() + TIMEOUT
            while sum(s.accepted for s in relay.stats()) < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            relay.close()
            (result,) = relay.collect()
            assert (result.reason, result.errno) == ("failed", errno.ECANCELED)
            assert (result.is_mptcp, result.subflows) == (False, 0)
            client.close()
        finally:
            relay.close()
            lsock.close()


def test_relay_listen_makes_the_listener_non_blocking(engine):
    relay = engine(workers=2)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    assert os.get_blocking(lsock.fileno())
    relay.listen(lsock.fileno(), socket.AF_INET, _refused_addr(), False)
    try:
        assert not os.get_blocking(lsock.fileno())
    finally:
        relay.close()
        lsock.close()


def test_close_takes_the_listener_out_of_every_epoll_set(engine):
    relay, lsock = listening_relay(engine, _refused_addr())
    inode = os.fstat(lsock.fileno()).st_ino
    try:
        deadline = time.monotonic() + TIMEOUT
        while not epoll_watches(inode):  # the workers registered it
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert relay.listening
        relay.close()
        assert not relay.listening
        assert not epoll_watches(inode)
        lsock.getsockname()  # still the caller's, open
    finally:
        relay.close()
        lsock.close()


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.mark.parametrize("how", ["closed relay", "same fd", "not a socket"])
def test_add_owns_both_fds_also_when_it_fails(engine, how):
    relay = engine()
    a, b = socket.socketpair()
    fd_a, fd_b = a.detach(), b.detach()
    r, w = os.pipe()
    try:
        if how == "closed relay":
            relay.close()
            with pytest.raises(RuntimeError):
                relay.add(fd_a, fd_b, 1)
        elif how == "same fd":
            os.close(fd_b)
            with pytest.raises(ValueError):
                relay.add(fd_a, fd_a, 1)
        else:
            os.close(fd_b)
            fd_b, r = r, -1  # the relay takes the pipe's read end
            with pytest.raises(OSError):
                relay.add(fd_a, fd_b, 1)
        assert not _is_open(fd_a) and not _is_open(fd_b)
    finally:
        relay.close()
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)


def test_active_never_wraps_under_churn(engine):
    # The control thread read the workers' `total` and `finished` without ordering: a
    # pair accepted and finished between the two reads made `active` 2**64 - 1 (or -1).
    relay, lsock = listening_relay(engine, _refused_addr())
    seen = []
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the twin: a thread switch between any two bytecodes
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            seen.append(relay.active)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        addr = lsock.getsockname()
        deadline = time.monotonic() + 3

        def churn():
            for _ in range(400):
                if time.monotonic() > deadline:
                    return
                with socket.create_connection(addr, timeout=TIMEOUT) as c:
                    c.recv(1)

        clients = [threading.Thread(target=churn, daemon=True) for _ in range(4)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(TIMEOUT)
        stop.set()
        poller.join(TIMEOUT)
        wild = [v for v in seen if not 0 <= v <= 1600]
        assert not wild, f"active took impossible values: {sorted(set(wild))[:5]}"
    finally:
        sys.setswitchinterval(switch)
        stop.set()
        relay.close()
        lsock.close()


SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/types.h>
/* Every third send()/splice() fails with EINTR before doing anything, as a signal
   arriving at the wrong moment would make it. */
static int calls;
ssize_t send(int fd, const void *buf, size_t n, int flags) {
    static ssize_t (*real)(int, const void *, size_t, int);
    if (!real) real = dlsym(RTLD_NEXT, "send");
    if (__atomic_add_fetch(&calls, 1, __ATOMIC_RELAXED) % 3 == 0) { errno = EINTR; return -1; }
    return real(fd, buf, n, flags);
}
ssize_t splice(int in, loff_t *oin, int out, loff_t *oout, size_t n, unsigned int fl) {
    static ssize_t (*real)(int, loff_t *, int, loff_t *, size_t, unsigned int);
    if (!real) real = dlsym(RTLD_NEXT, "splice");
    if (__atomic_add_fetch(&calls, 1, __ATOMIC_RELAXED) % 3 == 0) { errno = EINTR; return -1; }
    return real(in, oin, out, oout, n, fl);
}
"""

EINTR_SCRIPT = textwrap.dedent("""
    import sys, threading
    sys.path[:0] = [{repo!r}, {here!r}]
    from test_relay import Chain, MiB, recv_all, send_all, tcp_pair, wait_results
    from mptcpproxy.relay._relay import Relay
    relay = Relay(workers=1, bufsize=65536, splice={splice})
    chain = Chain(relay, make=tcp_pair)
    sent, got = [], []
    t = threading.Thread(target=recv_all, args=(chain.right, got), daemon=True)
    t.start()
    send_all(chain.left, 7, 32 * MiB, sent)
    t.join(60)
    assert got == [(32 * MiB, sent[0])], (got, sent)
    chain.close()
    print("intact", wait_results(relay)[0].reason)
""")


@pytest.mark.parametrize("splice", [False, True], ids=["c-copy", "c-splice"])
def test_eintr_on_send_is_retried_not_taken_for_a_full_socket(tmp_path, splice):
    # EINTR was handled as EAGAIN: the relay waited for an EPOLLOUT edge that had already
    # come, and the transfer stalled. The compiled engine only: the twin's socket calls
    # retry EINTR themselves (PEP 475).
    shim = tmp_path / "eintr.so"
    src = tmp_path / "eintr.c"
    src.write_text(SHIM)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", str(shim), str(src), "-ldl"],
                   check=True, timeout=60)
    script = EINTR_SCRIPT.format(repo=os.path.dirname(HERE), here=HERE, splice=splice)
    # after what is preloaded already (AddressSanitizer's runtime must come first)
    env = {**os.environ, "LD_PRELOAD": f"{os.environ.get('LD_PRELOAD', '')} {shim}".strip()}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=90, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "intact closed" in proc.stdout


class _FlakyEpoll:
    """A worker's epoll whose register() fails the first `failures` times for `fd`."""

    def __init__(self, ep, fd: int, failures: int) -> None:
        self.ep, self.fd, self.failures = ep, fd, failures

    def register(self, fd: int, mask: int) -> None:
        if fd == self.fd and self.failures > 0:
            self.failures -= 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # max_user_watches
        self.ep.register(fd, mask)

    def __getattr__(self, name: str):
        return getattr(self.ep, name)


def test_twin_worker_survives_an_unexpected_error_on_the_listener():
    # The compiled engine carries on when epoll_ctl() fails for the listener (it tries
    # again at the next scan); the twin's worker thread died of the OSError.
    from mptcpproxy.relay._relay_py import Relay

    upstream = socket.socket()
    upstream.bind(("127.0.0.1", 0))
    upstream.listen(8)
    upstream.settimeout(TIMEOUT)
    relay = Relay(workers=1)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    worker = relay._workers[0]
    worker.ep = _FlakyEpoll(worker.ep, lsock.fileno(), failures=2)
    try:
        relay.listen(lsock.fileno(), socket.AF_INET, upstream.getsockname(), False)
        with socket.create_connection(lsock.getsockname(), timeout=TIMEOUT) as client:
            served, _ = upstream.accept()
            with served:
                client.sendall(b"through")
                served.settimeout(TIMEOUT)
                assert served.recv(100) == b"through"
        assert worker.thread.is_alive()
    finally:
        relay.close()
        worker.ep = worker.ep.ep
        lsock.close()
        upstream.close()


SUBFLOW_SERVICE = textwrap.dedent("""
    import socket, sys
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((sys.argv[1], 4444))
    srv.listen(8)
    print("listening", flush=True)
    while True:
        conn, _ = srv.accept()
        with conn:
            while conn.recv(65536):
                pass
""")

def _subflows_through_relay(bed, engine_module: str, bind: str, blackhole: bool) -> int:
    """One relayed MPTCP connection from cli to srv, busy for ~2.5 s; srv listens on
    `bind` and announces its second address (where it drops everything if `blackhole`).
    The Result's subflows."""
    cli, srv = bed.host("cli"), bed.host("srv")
    bed.link(cli, srv, "10.123.230.1/24", "10.123.230.2/24")
    dev2 = bed.link(cli, srv, "10.123.231.1/24", "10.123.231.2/24").dev_b
    srv.mptcp_limits(subflows=2)
    cli.mptcp_limits(subflows=2, add_addr_accepted=2)
    srv.mptcp_endpoint("10.123.231.2", dev2, "signal")
    if blackhole:  # the join's SYN gets no answer: it stays under way
        srv.run(["nft", "-f", "-"], input=(
            "table inet blackhole {\n chain input {\n"
            "  type filter hook input priority 0; policy accept;\n"
            f"  iifname {dev2} drop\n }}\n}}\n"))
    service = srv.start([sys.executable, "-c", SUBFLOW_SERVICE, bind], name="service")
    wait_until(lambda: "listening" in service.stdout, 10, "the service")
    script = textwrap.dedent(f"""
        import socket, sys, time
        sys.path[:0] = [{os.path.dirname(HERE)!r}, {HERE!r}]
        from test_relay import wait_results
        from {engine_module} import Relay
        relay = Relay(workers=1)
        app, mid = socket.socketpair()
        up = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
        up.settimeout(10)
        up.connect(("10.123.230.2", 4444))
        fd = up.detach()
        relay.add(mid.detach(), fd, 1, fd)
        for _ in range(50):  # busy for 2.5 s: sampled at the start and once a second
            app.sendall(bytes(20000))
            time.sleep(0.05)
        app.close()
        (result,) = wait_results(relay)
        print("subflows", result.is_mptcp, result.subflows, result.reason)
        relay.close()
    """)
    out = cli.run([sys.executable, "-c", script], timeout=60).stdout
    words = out.split()
    assert words[:2] == ["subflows", "True"], out
    return int(words[2])


@pytest.mark.privileged
@pytest.mark.parametrize("module", ["mptcpproxy.relay._relay", "mptcpproxy.relay._relay_py"],
                         ids=["c", "py"])
@pytest.mark.parametrize("case", ["refused-join", "unanswered-join", "joined"])
def test_subflows_counts_established_subflows_only(testbed, module, case):
    # mptcpi_subflows counts a join still waiting for its answer (and one that was
    # refused): a connection whose second subflow never came up was reported subflows=2.
    bind = "10.123.230.2" if case == "refused-join" else "0.0.0.0"
    subflows = _subflows_through_relay(testbed, module, bind, case == "unanswered-join")
    assert subflows == (2 if case == "joined" else 1)
