"""The pure-Python twin of `_relay`: the same API and the same algorithm, used when the
extension is absent and as the test oracle. Keep the two in step."""

from __future__ import annotations

import errno as E
import os
import select
import signal
import socket
import struct
import threading
import time
from collections import deque

from mptcpproxy.relay._relay_py_accept import (
    MAX_LISTENERS,
    Accept,
    ListenCfg,
    _ids,
    _Listen,
    try_setsockopt,
)
from mptcpproxy.relay._relay_py_paths import AddrTotals, peer
from mptcpproxy.relay._relay_py_pump import Pump, _Pair
from mptcpproxy.relay._results import (
    ABORTED,
    CLOSED,
    ERROR,
    FAILED,
    MAX_SECONDS,
    RESET,
    TIMEOUT,
    ConnStat,
    Result,
    WorkerStats,
)

NOTIFY_S = 0.02  # the longest a finished pair waits to be reported: fewer wake-ups
MAX_TAGS = 1024  # listener tags: 0 .. MAX_TAGS-1, as the compiled engine
_ET_MASK = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_READABLE = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_WRITABLE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_RDHUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_LINGER_RST = struct.pack("ii", 1, 0)


class _Worker(Pump, Accept):
    def __init__(self, bufsize: int, notify_fd: int, results: deque, busy_poll: float = 0.0,
                 path_stats: bool = True):
        self.bufsize = bufsize
        # path_stats: per-address counters (None: off), the open pairs as last published
        self.acc = AddrTotals() if path_stats else None
        self.published: list[tuple[float, ConnStat]] = []  # (start, as published)
        self.pub_lock = threading.Lock()
        self.busy_poll = busy_poll  # poll without sleeping this long after the last event
        self.pipes: list[tuple[int, int]] = []  # spare empty pipes
        self.notify_fd = notify_fd
        self.results = results
        self.ep = select.epoll()
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ep.register(self.wake_fd, select.EPOLLIN)
        self.lock = threading.Lock()
        self.incoming: list[_Pair] = []
        self.pairs: dict[int, tuple[_Pair, int]] = {}  # fd -> (pair, side)
        self.ready: list[_Pair] = []
        # Sockets of pairs finished in this batch, closed after it: until then their fd
        # numbers cannot be reused by a new pair that later events of the batch would reach.
        self.graveyard: list[socket.socket] = []
        self.total = self.finished = self.nbytes = 0
        self.accepted = self.accept_errors = 0
        self.notify_pending, self.last_notify = False, 0.0
        self.listeners: dict[int, _Listen] = {}  # Relay.listen: accept here too
        self.paused = False  # a wanted listener is out of the epoll set for now
        self.held: set[_Pair] = set()  # accepted clients waiting for an fd for their upstream
        self.open_by_tag: dict[int, int] = {}  # pairs open per listener tag
        self.accepted_by_tag: dict[int, int] = {}  # clients this worker accepted, per tag
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="mptcpproxy-relay-py", daemon=True)
        self.thread.start()

    @property
    def active(self) -> int:
        # `finished` first: a pair accepted and finished between two reads of the other
        # order made this -1.
        finished = self.finished
        return max(self.total - finished, 0)

    def push(self, pair: _Pair) -> None:
        with self.lock:
            self.incoming.append(pair)
            self.total += 1
        self.count_open(pair.tag, 1)
        os.eventfd_write(self.wake_fd, 1)

    def wake(self) -> None:
        os.eventfd_write(self.wake_fd, 1)

    def count_open(self, tag: int, delta: int) -> None:
        with self.lock:
            self.open_by_tag[tag] = self.open_by_tag.get(tag, 0) + delta

    def stop(self) -> None:
        self.stopping = True
        os.eventfd_write(self.wake_fd, 1)
        self.thread.join()
        self.ep.close()
        os.close(self.wake_fd)
        for fds in self.pipes:
            os.close(fds[0])
            os.close(fds[1])
        self.pipes = []

    # -- the loop -------------------------------------------------------------------------

    def _run(self) -> None:
        # splice() into a socket whose peer is gone raises SIGPIPE (no MSG_NOSIGNAL there):
        # blocked in this thread, it stays pending instead of killing the process.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPIPE})
        next_scan = next_pub = now = last_event = 0.0
        while True:
            busy = self.pairs or self.paused
            if self.ready or now - last_event < self.busy_poll:
                timeout = 0  # more to do, or busy polling: the next event is handled unslept
            else:
                timeout = 0.25 if busy else -1
            if self.notify_pending and not 0 <= timeout <= NOTIFY_S:
                timeout = NOTIFY_S
            events = self.ep.poll(timeout)
            now = time.monotonic()
            if events:
                last_event = now
            for fd, ev in events:
                if fd == self.wake_fd:
                    self._take_incoming(now)
                    continue
                listener = self.listeners.get(fd)
                if listener is not None:
                    if listener.listening:
                        self._accept_some(listener, now)
                    continue
                entry = self.pairs.get(fd)
                if entry is None:
                    continue
                pair, i = entry
                if pair.dead:
                    continue
                if ev & _READABLE:
                    pair.readable[i] = True
                if ev & _RDHUP:
                    pair.rdhup[i] = True
                if ev & _WRITABLE:
                    pair.writable[i] = True
                if pair.connecting and self._connect_pending(pair, i, ev):
                    continue
                if ev & select.EPOLLERR:
                    err = pair.socks[i].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        self._fail(pair, err)
                        continue
                self._pump(pair, now)
            ready, self.ready = self.ready, []
            for pair in ready:
                pair.queued = False
                if not pair.dead:
                    self._pump(pair, now)
            if now >= next_scan:
                self._scan(now)
                self._sync_listener(now)
                next_scan = now + 0.25
            if now >= next_pub or (not self.pairs and not self.held and self.published):
                self._publish(now)  # for connections(): every second, and once all ended
                next_pub = now + 1.0
            self._bury()
            if self.notify_pending and now - self.last_notify >= NOTIFY_S:
                # Each write wakes the control thread: at most one per NOTIFY_S.
                self.notify_pending = False
                self.last_notify = now
                os.eventfd_write(self.notify_fd, 1)
            if self.stopping:
                self._take_incoming(now)
                for pair in [*self.held, *(p for p, _ in self.pairs.values())]:
                    # a pair whose upstream never answered: a connect that was cut short
                    self._finish(pair, *((FAILED, E.ECANCELED) if pair.connecting
                                         else (ABORTED, 0)))
                self.set_unlisten(None)
                self._sync_listener(now)
                self._bury()
                return

    def _scan(self, now: float) -> None:
        # Idle timeouts, and the MPTCP status of busy pairs once a second: subflows come
        # and go during a connection, and after a reset the kernel has already dropped them.
        for pair in list(self.held):
            self._retry_held(pair, now)
        for pair, i in list(self.pairs.values()):
            if i == 1 or pair.dead:
                continue
            if pair.connecting:
                if now - pair.start >= pair.connect_timeout:
                    self._finish(pair, FAILED, E.ETIMEDOUT)
            elif pair.idle > 0 and now - pair.last >= pair.idle:
                self._finish(pair, TIMEOUT, 0)
            elif pair.mptcp_side >= 0 and pair.last > pair.sampled and now - pair.sampled >= 1:
                pair.sample_mptcp(self.acc)  # a path sample
                pair.sampled = now

    def _take_incoming(self, now: float) -> None:
        try:
            os.eventfd_read(self.wake_fd)
        except BlockingIOError:
            pass
        with self.lock:
            incoming, self.incoming = self.incoming, []
        for pair in incoming:
            if self._register(pair, now):
                pair.sample_mptcp(None, status=True)
        self._sync_listener(now)

    def _register(self, pair: _Pair, now: float) -> bool:
        pair.last = now
        pair.sampled = now - 0.75  # the first periodic sample 0.25 s in (see _relay.pyx)
        for i, sock in enumerate(pair.socks):
            self.pairs[sock.fileno()] = (pair, i)
        try:
            for sock in pair.socks:
                self.ep.register(sock.fileno(), _ET_MASK)
        except OSError as exc:
            self._finish(pair, ERROR, exc.errno or 0)
            return False
        return True

    def _finish(self, pair: _Pair, reason: str, err: int) -> None:
        if pair.dead:
            return
        self._release_held(pair)
        if reason == FAILED:
            pair.is_mptcp, pair.subflows = False, 0  # never connected: no MPTCP status
        else:
            if reason != CLOSED:  # a clean close: the second EOF's sample is the last one
                pair.sample_mptcp(self.acc)  # the last sample, before close()
            if pair.paths is not None:
                pair.paths.closed()
        rst = reason in (RESET, ERROR, ABORTED) or (reason == TIMEOUT and pair.holds_bytes())
        for sock in pair.socks:
            if sock is None:
                continue
            fd = sock.fileno()
            self.pairs.pop(fd, None)
            try:
                # out of the epoll set before close(): the open file can outlive the fd
                self.ep.unregister(fd)
            except (OSError, ValueError):
                pass  # never registered (a failed connect, a failed register)
            if rst:  # a FIN would tell the receiver of undelivered bytes it had them all
                try_setsockopt(sock, socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            self.graveyard.append(sock)
        pair.dead = True
        pair.pending = [b"", b""]
        self._end_splice(pair, 0, 0)
        self._end_splice(pair, 1, 0)
        self.finished += 1
        paths = pair.paths
        self._report(Result(
            pair.conn_id, pair.nbytes[0], pair.nbytes[1], time.monotonic() - pair.start,
            reason, err, pair.is_mptcp, pair.subflows, pair.client, pair.tag,
            *((paths.stats(), *paths.totals[:3]) if paths else ()),
        ))
        self.count_open(pair.tag, -1)  # after the report (see _relay.pyx)

    def _publish(self, now: float) -> None:
        seen, out = set(), []
        for pair in [*self.held, *(p for p, _ in self.pairs.values())]:
            if id(pair) in seen or pair.dead:
                continue
            seen.add(id(pair))
            if pair.is_mptcp and pair.paths is None and self.acc is not None:
                pair.sample_mptcp(self.acc)  # not path-sampled yet: list its paths
            paths = pair.paths
            out.append((pair.start, ConnStat(
                pair.conn_id, pair.tag, pair.client or pair.peer_a, pair.upstream,
                0.0, pair.nbytes[0], pair.nbytes[1], pair.is_mptcp,
                pair.subflows, paths.stats() if paths else (),
                *(paths.totals[:3] if paths else (0, 0, 0)), pair.connecting,
            )))
        with self.pub_lock:
            self.published = out

    def connections(self) -> list[ConnStat]:
        with self.pub_lock:
            published = self.published
        now = time.monotonic()  # the ages as of now; the rest as of the last publication
        return [conn._replace(age=max(now - start, 0.0)) for start, conn in published]

    def _bury(self) -> None:
        graveyard, self.graveyard = self.graveyard, []
        for sock in graveyard:
            sock.close()

    def _report(self, result: Result) -> None:
        self.results.append(result)
        self.notify_pending = True


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _check_tag(tag: int) -> int:
    if not 0 <= tag < MAX_TAGS:
        raise ValueError(f"tag must be from 0 to {MAX_TAGS - 1}, not {tag}")
    return tag


def _check_seconds(name: str, value: float, zero_ok: bool) -> None:
    # The same bounds as the compiled engine, which holds times as int64 nanoseconds.
    if not (value >= 0 if zero_ok else value > 0) or not value <= MAX_SECONDS:
        raise ValueError(f"{name} must be {'at least 0' if zero_ok else 'more than 0'} "
                         f"and at most {MAX_SECONDS:g} seconds, not {value}")


class Relay:
    """Worker threads that pump bytes between pairs of sockets; see _relay.pyi."""

    def __init__(self, workers: int = 1, bufsize: int = 131072, idle_timeout: float = 0.0,
                 splice: bool = False, busy_poll: float = 0.0, path_stats: bool = True):
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if bufsize < 4096:
            raise ValueError("bufsize must be at least 4096")
        _check_seconds("idle_timeout", idle_timeout, True)
        _check_seconds("busy_poll", busy_poll, True)
        self._results: deque[Result] = deque()
        self._splice = splice  # defaults for pairs and listeners that name none
        self._idle_timeout = idle_timeout
        self._notify_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._workers = [_Worker(bufsize, self._notify_fd, self._results, busy_poll,
                                 path_stats) for _ in range(workers)]
        self._closed = False
        self._listeners: dict[int, socket.socket] = {}  # the callers' fds, never closed

    def __reduce__(self):
        raise TypeError("a relay holds fds and cannot be pickled")

    @property
    def notify_fd(self) -> int:
        return self._notify_fd

    @property
    def active(self) -> int:
        return sum(w.active for w in self._workers)

    def add(self, fd_a: int, fd_b: int, conn_id: int, mptcp_fd: int = -1, *, tag: int = 0,
            idle_timeout: float | None = None, splice: bool | None = None) -> None:
        # Both fds belong to the relay from this call on: if it fails, they are closed.
        socks: list[socket.socket] = []
        splice = self._splice if splice is None else splice
        try:
            if self._closed:
                raise RuntimeError("the relay is closed")
            if fd_a < 0 or fd_b < 0 or fd_a == fd_b:
                raise ValueError("two distinct open fds are needed")
            _check_tag(tag)
            idle = self._idle(idle_timeout)
            for fd in (fd_a, fd_b):
                socks.append(socket.socket(fileno=fd))
            if splice:  # a blocking fd would let one splice() hold up the thread
                for sock in socks:
                    sock.setblocking(False)
        except BaseException:
            for sock in socks:
                sock.close()
            for fd in {fd_a, fd_b}.difference(s.fileno() for s in socks if s.fileno() >= 0):
                if fd >= 0:
                    _close_quietly(fd)
            raise
        side = 0 if mptcp_fd == fd_a else 1 if mptcp_fd == fd_b else -1
        worker = min(self._workers, key=lambda w: w.active)
        pair = _Pair(socks, conn_id, side, None, tag, idle, splice)
        pair.peer_a, pair.upstream = peer(socks[0]), peer(socks[1])
        worker.push(pair)

    def _idle(self, idle_timeout: float | None) -> float:
        idle = self._idle_timeout if idle_timeout is None else idle_timeout
        _check_seconds("idle_timeout", idle, True)
        return idle

    def new_id(self) -> int:
        return next(_ids)

    def listen(self, fd: int, family: int, sockaddr: tuple, mptcp: bool, mptcp_side: int = -1,
               mark: int = 0, connect_timeout: float = 10.0, *, tag: int = 0,
               idle_timeout: float | None = None, splice: bool | None = None) -> None:
        if self._closed:
            raise RuntimeError("the relay is closed")
        if mptcp_side not in (-1, 0, 1):
            raise ValueError(f"mptcp_side must be -1, 0 or 1, not {mptcp_side}")
        _check_seconds("connect_timeout", connect_timeout, False)
        cfg = ListenCfg(family, sockaddr, 262 if mptcp else 0, mptcp_side, mark,
                        connect_timeout, _check_tag(tag), self._idle(idle_timeout),
                        self._splice if splice is None else splice)
        sock = self._listeners.get(fd)
        if sock is None:  # the caller's fd: detached at close, never closed
            sock = self._listeners[fd] = socket.socket(fileno=fd)
        # accept() in a loop until EAGAIN: a blocking listener would hang the worker
        sock.setblocking(False)
        # Accepted sockets inherit TCP_NODELAY: no setsockopt() per client.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for w in self._workers:
            if not w.set_listen(sock, cfg):
                self.unlisten(fd)
                raise RuntimeError(f"a relay serves at most {MAX_LISTENERS} listeners")
            w.wake()

    def unlisten(self, fd: int | None = None) -> None:
        for w in self._workers:
            w.set_unlisten(fd)
            w.wake()

    def holds(self, fd: int) -> bool:
        return any(w.holds(fd) for w in self._workers)

    @property
    def listening(self) -> bool:
        return any(w.holds(None) for w in self._workers)

    def accepted(self, tag: int) -> int:
        _check_tag(tag)
        return sum(w.accepted_by_tag.get(tag, 0) for w in self._workers)

    def open_pairs(self, tag: int) -> int:
        _check_tag(tag)
        return max(0, sum(w.open_by_tag.get(tag, 0) for w in self._workers))

    def collect(self) -> list[Result]:
        if self._notify_fd >= 0:
            try:
                os.eventfd_read(self._notify_fd)
            except BlockingIOError:
                pass
        out = []
        while self._results:
            out.append(self._results.popleft())
        return out

    def stats(self) -> list[WorkerStats]:
        return [WorkerStats(w.active, w.total, w.nbytes, w.accepted, w.accept_errors)
                for w in self._workers]

    def connections(self) -> list[ConnStat]:
        return [conn for w in self._workers for conn in w.connections()]

    def path_totals(self) -> tuple[dict, int]:
        out: dict = {}
        reinjected = sum(w.acc.add_to(out) for w in self._workers if w.acc is not None)
        return out, reinjected

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            w.stop()
        self._workers = []
        for sock in self._listeners.values():
            sock.detach()
        self._listeners = {}
        os.close(self._notify_fd)
        self._notify_fd = -1

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()
