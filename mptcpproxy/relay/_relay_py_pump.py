"""The pure-Python twin's byte pump: moving the bytes of one pair, by recv()/send() or by
splice() through a pipe for bulk. A mixin of `_relay_py._Worker`; keep it in step with
`_relay_pump.pxi`."""

from __future__ import annotations

import ctypes
import errno as E
import fcntl
import os
import socket
import struct
import time

from mptcpproxy.relay._relay_py_paths import AddrTotals, PathSet, full_info
from mptcpproxy.relay._results import CLOSED, ERROR, RESET
from mptcpproxy.sockets import MPTCP_INFO, SOL_MPTCP, TCP_IS_MPTCP

MPTCP_FULL_INFO = 4  # Linux 6.5+

READ_BUDGET = 16
POOL_KEEP = 8  # spare empty pipes a worker keeps
SPLICE_MIN = 65536  # a read this large makes a half splice; a turn moving less, copy
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK

_libc = ctypes.CDLL(None, use_errno=True)
_TCPI_SIZE = 136  # bytes of tcp_info read per subflow: up to tcpi_bytes_received (@128)
MAX_SUBFLOWS = 16


def established_subflows(fd: int) -> int | None:
    """Subflows whose handshake completed (MPTCP_FULL_INFO); None before Linux 6.5.

    The request header (user sizes, array pointers) must be filled in, which Python's
    socket.getsockopt() cannot do: libc's getsockopt() through ctypes."""
    tcpi = ctypes.create_string_buffer(_TCPI_SIZE * MAX_SUBFLOWS)
    head = struct.pack("=6I2Q", 0, _TCPI_SIZE, 0, 0, 0, MAX_SUBFLOWS, 0,
                       ctypes.addressof(tcpi))
    buf = ctypes.create_string_buffer(head + bytes(96), len(head) + 96)
    size = ctypes.c_uint32(len(buf))
    if _libc.getsockopt(fd, SOL_MPTCP, MPTCP_FULL_INFO, buf, ctypes.byref(size)) != 0:
        return None
    n = min(struct.unpack_from("=I", buf, 16)[0], MAX_SUBFLOWS)
    return sum(1 for i in range(n) if subflow_came_up(
        tcpi.raw[i * _TCPI_SIZE], *struct.unpack_from("=QQ", tcpi, i * _TCPI_SIZE + 120)))


def subflow_came_up(state: int, acked: int, received: int) -> bool:
    """A subflow whose handshake completed (see _relay.pyx, subflow_came_up)."""
    if state in (2, 3, 10):  # SYN_SENT, SYN_RECV: a join under way; LISTEN
        return False
    return state != 7 or acked > 0 or received > 0  # CLOSE with nothing: refused


class _Pair:
    __slots__ = (
        "socks", "readable", "writable", "rdhup", "pending", "nbytes", "done", "conn_id",
        "mptcp_side", "is_mptcp", "subflows", "start", "last", "sampled", "dead", "queued",
        "connecting", "client", "splicing", "pipe", "inpipe", "tag", "idle", "splice",
        "connect_timeout", "held", "paths", "peer_a", "upstream",
    )

    def __init__(self, socks: list, conn_id: int, mptcp_side: int,
                 client: tuple | None = None, tag: int = 0, idle: float = 0.0,
                 splice: bool = False, connect_timeout: float = 0.0) -> None:
        self.socks = socks  # [a, b]; b is None until an accepted pair's upstream exists
        self.tag = tag  # the listener it came from
        self.idle = idle  # close after this long without a byte moving (0: never)
        self.splice = splice  # halves that move bulk splice through a pipe
        self.connect_timeout = connect_timeout  # accepted pairs: give up connecting then
        self.held = None  # no fd for the upstream yet: its ListenCfg (the scan retries)
        self.connecting = False  # accepted by the worker, upstream connect() under way
        self.client = client
        self.readable = [False, False]
        self.writable = [False, False]
        self.rdhup = [False, False]  # FIN (or an error) signalled: read on until EOF
        self.pending = [b"", b""]  # per half: bytes the destination would not take
        self.splicing = [0, 0]  # per half: 1 splicing (it holds `pipe`), -1 not supported
        self.pipe: list[tuple[int, int] | None] = [None, None]
        self.inpipe = [0, 0]  # bytes in the pipe, not yet sent on
        self.nbytes = [0, 0]
        self.done = [False, False]
        self.conn_id = conn_id
        self.mptcp_side = mptcp_side
        self.is_mptcp = False
        self.subflows = 0
        self.start = self.last = self.sampled = time.monotonic()
        self.dead = False
        self.queued = False
        self.paths: PathSet | None = None  # path_stats, MPTCP: the last sample per subflow
        self.peer_a = self.upstream = None  # where the sides are connected (connections())

    def holds_bytes(self) -> bool:
        """Bytes read from one peer and not yet delivered to the other."""
        return bool(self.pending[0] or self.pending[1] or self.inpipe[0] or self.inpipe[1])

    def sample_mptcp(self, acc: AddrTotals | None, status: bool = False) -> None:
        """`acc`: the worker's per-address counters (path_stats on: a path sample), else
        None: the subflows are only counted. `status` (at connect): TCP_IS_MPTCP only,
        and an established MPTCP connection has its initial subflow (see _relay.pyx)."""
        if self.mptcp_side < 0 or self.connecting:
            return
        sock = self.socks[self.mptcp_side]
        try:
            if not sock.getsockopt(socket.IPPROTO_TCP, TCP_IS_MPTCP):
                return
            self.is_mptcp = True
            if status:
                self.subflows = max(self.subflows, 1)
                return
            n = (self._sample_paths(sock.fileno(), acc) if acc is not None
                 else established_subflows(sock.fileno()))
            if n is None:  # an older kernel: joins under way are counted too
                n = sock.getsockopt(SOL_MPTCP, MPTCP_INFO, 4)[0] + 1
            self.subflows = max(self.subflows, n)
        except OSError:
            pass

    def _sample_paths(self, fd: int, acc: AddrTotals) -> int | None:
        sample = full_info(fd)
        if sample is None:
            return None
        if self.paths is None:
            self.paths = PathSet()
        return self.paths.fold(*sample, acc)


class Pump:
    """Needs from the worker: `bufsize`, `acc`, `pipes` (the spare pipes), `ready`,
    `nbytes`, and `_finish(pair, reason, err)`."""

    bufsize: int
    acc: AddrTotals | None
    pipes: list[tuple[int, int]]
    ready: list[_Pair]
    nbytes: int

    def _pump(self, pair: _Pair, now: float) -> None:
        if self._pump_half(pair, 0, now) and self._pump_half(pair, 1, now):
            if pair.done[0] and pair.done[1]:
                self._finish(pair, CLOSED, 0)

    def _pump_half(self, pair: _Pair, h: int, now: float) -> bool:
        """Move bytes from side h to side 1-h; False when the pair was closed."""
        if pair.done[h]:
            return True
        if pair.splicing[h] > 0:
            spliced = self._splice_half(pair, h, now, READ_BUDGET, 0)
            if spliced is not None:
                return spliced
        src, dst, d = pair.socks[h], pair.socks[1 - h], 1 - h
        if pair.pending[h]:
            if not pair.writable[d]:
                return True
            try:
                sent = dst.send(pair.pending[h], socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
            except BlockingIOError:
                pair.writable[d] = False
                return True
            except OSError as exc:
                return self._fail(pair, exc.errno or 0)
            self._moved(pair, h, sent, now)  # a slow reader draining is not idle
            pair.pending[h] = pair.pending[h][sent:]
            if pair.pending[h]:
                pair.writable[d] = False
                return True
        budget = READ_BUDGET
        while pair.readable[h]:
            if budget == 0:
                self._requeue(pair)
                return True
            budget -= 1
            try:
                data = src.recv(self.bufsize, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pair.readable[h] = False
                break
            except InterruptedError:
                continue
            except OSError as exc:
                return self._fail(pair, exc.errno or 0)
            if not data:
                self._eof(pair, h)
                return True
            pair.last = now
            sent = 0
            if pair.writable[d]:
                try:
                    sent = dst.send(data, socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    return self._fail(pair, exc.errno or 0)
                self._moved(pair, h, sent, now)
            if sent < len(data):
                pair.pending[h] = data[sent:]
                pair.writable[d] = False
                return True
            if (len(data) >= SPLICE_MIN and pair.splice and pair.splicing[h] == 0
                    and self._start_splice(pair, h)):
                # bulk: splice the rest of this burst and what follows
                spliced = self._splice_half(pair, h, now, budget, len(data))
                if spliced is not None:
                    return spliced
                continue
            if len(data) < self.bufsize and not pair.rdhup[h]:
                pair.readable[h] = False  # a short read emptied the socket (see _relay.pyx)
        return True

    def _moved(self, pair: _Pair, h: int, n: int, now: float) -> None:
        pair.nbytes[h] += n
        self.nbytes += n
        pair.last = now

    def _requeue(self, pair: _Pair) -> None:
        # Out of read budget: another turn after everyone else.
        if not pair.queued:
            pair.queued = True
            self.ready.append(pair)

    def _eof(self, pair: _Pair, h: int) -> None:
        # Nothing is pending for the destination: half-close it now.
        # A sample at the MPTCP peer's DATA_FIN and at the second EOF, while the subflows
        # are still listed, and at the other's for a pair with path data (see
        # _relay_pump.pxi, half_eof).
        m = pair.mptcp_side
        if m >= 0 and (h == m or pair.done[m] or pair.paths is not None):
            pair.sample_mptcp(self.acc)
        try:
            pair.socks[1 - h].shutdown(socket.SHUT_WR)
        except OSError:
            pass  # a reset destination shows up as EPOLLERR
        pair.done[h] = True
        pair.readable[h] = False

    def _splice_half(self, pair: _Pair, h: int, now: float, budget: int,
                     moved: int) -> bool | None:
        """A splicing half: src -> pipe -> dst. As _pump_half; None when splice() is not
        supported here (the caller copies). A short splice() does not mean the socket is
        empty, so it reads on to EAGAIN (see _relay.pyx)."""
        src, dst, d = pair.socks[h].fileno(), pair.socks[1 - h].fileno(), 1 - h
        rd, wr = pair.pipe[h]
        while True:
            if pair.inpipe[h]:
                if not pair.writable[d]:
                    return True
                try:
                    n = os.splice(rd, dst, pair.inpipe[h], flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    pair.writable[d] = False
                    return True
                except OSError as exc:
                    return self._fail(pair, exc.errno or 0)
                self._moved(pair, h, n, now)
                pair.inpipe[h] -= n
                if pair.inpipe[h]:
                    pair.writable[d] = False  # the destination is full: wait for EPOLLOUT
                    return True
            if not pair.readable[h]:
                break
            if budget == 0:
                self._requeue(pair)
                return True
            budget -= 1
            try:
                n = os.splice(src, wr, self.bufsize, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                pair.readable[h] = False
                break
            except OSError as exc:
                if exc.errno in (E.EINVAL, E.ENOSYS):
                    self._end_splice(pair, h, -1)  # nothing moved: copy from now on
                    return None
                return self._fail(pair, exc.errno or 0)
            if n == 0:
                self._eof(pair, h)
                break
            pair.inpipe[h] = n
            moved += n
            pair.last = now
        if moved < SPLICE_MIN or pair.done[h]:
            self._end_splice(pair, h, 0)  # the bulk is over: copy again
        return True

    def _start_splice(self, pair: _Pair, h: int) -> bool:
        """The half starts splicing, with an empty pipe; False (it copies) when there is
        none (out of fds)."""
        if self.pipes:
            pair.pipe[h] = self.pipes.pop()
        else:
            try:
                fds = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                return False
            try:
                fcntl.fcntl(fds[1], fcntl.F_SETPIPE_SZ, self.bufsize)
            except OSError:
                pass  # the kernel's default size then
            pair.pipe[h] = fds
        pair.splicing[h] = 1
        pair.inpipe[h] = 0
        return True

    def _end_splice(self, pair: _Pair, h: int, state: int) -> None:
        """The half stops splicing (state 0: until the next bulk; -1: for good). An empty
        pipe goes back to the pool; one still holding bytes is closed with them."""
        fds = pair.pipe[h]
        if fds is not None:
            if pair.inpipe[h] == 0 and len(self.pipes) < POOL_KEEP:
                self.pipes.append(fds)
            else:
                os.close(fds[0])
                os.close(fds[1])
            pair.pipe[h] = None
        pair.splicing[h] = state
        pair.inpipe[h] = 0

    def _fail(self, pair: _Pair, err: int) -> bool:
        self._finish(pair, RESET if err in (E.ECONNRESET, E.EPIPE) else ERROR, err)
        return False
