"""The pure-Python twin of `_relay`: the same API and the same algorithm, used when the
extension is absent and as the test oracle. Keep the two in step."""

from __future__ import annotations

import errno as E
import itertools
import os
import select
import signal
import socket
import struct
import threading
import time
from collections import deque

from mptcpproxy.relay._relay_py_pump import Pump, _Pair
from mptcpproxy.relay._results import (
    ABORTED,
    ACCEPT_ERROR,
    ERROR,
    FAILED,
    MAX_SECONDS,
    RESET,
    TIMEOUT,
    Result,
    WorkerStats,
)

ACCEPT_BATCH = 64
NOTIFY_S = 0.02  # the longest a finished pair waits to be reported: fewer wake-ups
_OUT_OF_RESOURCES = (E.EMFILE, E.ENFILE, E.ENOBUFS, E.ENOMEM)
_ids = itertools.count(1)  # connection ids, shared by every relay (next() holds the GIL)
_ET_MASK = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_READABLE = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_WRITABLE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_RDHUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_LINGER_RST = struct.pack("ii", 1, 0)


class _Worker(Pump):
    def __init__(self, bufsize: int, idle_timeout: float, notify_fd: int, results: deque,
                 splice: bool = False, busy_poll: float = 0.0):
        self.bufsize = bufsize
        self.splice = splice
        self.busy_poll = busy_poll  # poll without sleeping this long after the last event
        self.pipes: list[tuple[int, int]] = []  # spare empty pipes
        self.idle = idle_timeout
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
        self.listener: socket.socket | None = None  # Relay.listen: accept here too
        self.want_listen = self.listening = False
        self.resume_at = 0.0
        self.upstream: tuple = ()  # (family, sockaddr, proto, mptcp_side, mark, timeout)
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
        os.eventfd_write(self.wake_fd, 1)

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
        next_scan = now = last_event = 0.0
        while True:
            busy = self.pairs or (self.want_listen and not self.listening)
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
                if self.listener is not None and fd == self.listener.fileno():
                    self._accept_some(now)
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
            self._bury()
            if self.notify_pending and now - self.last_notify >= NOTIFY_S:
                # Each write wakes the control thread: at most one per NOTIFY_S.
                self.notify_pending = False
                self.last_notify = now
                os.eventfd_write(self.notify_fd, 1)
            if self.stopping:
                self._take_incoming(now)
                for pair, _ in list(self.pairs.values()):
                    # a pair whose upstream never answered: a connect that was cut short
                    self._finish(pair, *((FAILED, E.ECANCELED) if pair.connecting
                                         else (ABORTED, 0)))
                self.want_listen = False
                self._sync_listener(now)
                self._bury()
                return

    def _scan(self, now: float) -> None:
        # Idle timeouts, and the MPTCP status of busy pairs once a second: subflows come
        # and go during a connection, and after a reset the kernel has already dropped them.
        for pair, i in list(self.pairs.values()):
            if i == 1 or pair.dead:
                continue
            if pair.connecting:
                if now - pair.start >= self.upstream[5]:
                    self._finish(pair, FAILED, E.ETIMEDOUT)
            elif self.idle > 0 and now - pair.last >= self.idle:
                self._finish(pair, TIMEOUT, 0)
            elif pair.mptcp_side >= 0 and pair.last > pair.sampled and now - pair.sampled >= 1:
                pair.sample_mptcp()
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
                pair.sample_mptcp()
        self._sync_listener(now)

    def _register(self, pair: _Pair, now: float) -> bool:
        pair.last = pair.sampled = now
        for i, sock in enumerate(pair.socks):
            self.pairs[sock.fileno()] = (pair, i)
        try:
            for sock in pair.socks:
                self.ep.register(sock.fileno(), _ET_MASK)
        except OSError as exc:
            self._finish(pair, ERROR, exc.errno or 0)
            return False
        return True

    # -- accept + connect in the worker (Relay.listen) -------------------------------------

    def _sync_listener(self, now: float) -> None:
        # A failing epoll_ctl leaves the state as it was, to be tried again at the next
        # scan: the worker thread must not die of it (its pairs would hang).
        if self.listener is None:
            return
        try:
            if self.want_listen and not self.listening and now >= self.resume_at:
                self.ep.register(self.listener.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)
                self.listening = True
            elif self.listening and (not self.want_listen or now < self.resume_at):
                self.ep.unregister(self.listener.fileno())
                self.listening = False
        except (OSError, ValueError):
            pass

    def _accept_some(self, now: float) -> None:
        family, sockaddr, proto, mptcp_side, mark, _ = self.upstream
        for _ in range(ACCEPT_BATCH):
            try:
                client, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:  # leave the listener alone for 100 ms
                    self.accept_errors += 1
                    self.resume_at = now + 0.1
                    self._sync_listener(now)
                    self._report(Result(0, 0, 0, 0.0, ACCEPT_ERROR, exc.errno, False, 0))
                    return
                continue  # ECONNABORTED and the like: that client is gone already
            self.accepted += 1
            client.setblocking(False)
            pair = _Pair([client, None], next(_ids), mptcp_side, addr[:2])
            with self.lock:
                self.total += 1
            try:
                up = socket.socket(family, socket.SOCK_STREAM, proto)
            except OSError as exc:
                self._finish(pair, FAILED, exc.errno or 0)
                if exc.errno in _OUT_OF_RESOURCES:  # accept no more clients we cannot serve
                    self.accept_errors += 1
                    self.resume_at = now + 0.1
                    self._sync_listener(now)
                    return
                continue
            pair.socks[1] = up
            try:
                up.setblocking(False)
                if mark:  # as the compiled engine: a refused mark is not fatal here
                    _try_setsockopt(up, socket.SOL_SOCKET, socket.SO_MARK, mark)
                # No Nagle delay added by the relay (the client has it from the listener).
                _try_setsockopt(up, socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                err = up.connect_ex(sockaddr)
            except OSError as exc:
                err = exc.errno or E.EINVAL
            if err not in (0, E.EINPROGRESS):
                self._finish(pair, FAILED, err)
                continue
            pair.connecting = True  # even when done already: EPOLLOUT follows at once
            self._register(pair, now)

    def _connect_pending(self, pair: _Pair, i: int, ev: int) -> bool:
        # True while nothing may move yet (the client's readiness is kept for later).
        if i == 0:
            if ev & select.EPOLLERR:
                err = pair.socks[0].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._fail(pair, err)  # the client gave up while we were connecting
            return True
        if not ev & (select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP):
            return True
        if ev & (select.EPOLLERR | select.EPOLLHUP):  # EPOLLOUT alone: connected
            err = pair.socks[1].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._finish(pair, FAILED, err)
                return True
        pair.connecting = False
        pair.sample_mptcp()
        return False

    def _finish(self, pair: _Pair, reason: str, err: int) -> None:
        if pair.dead:
            return
        if reason == FAILED:
            pair.is_mptcp, pair.subflows = False, 0  # never connected: no MPTCP status
        else:
            pair.sample_mptcp()
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
                _try_setsockopt(sock, socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            self.graveyard.append(sock)
        pair.dead = True
        pair.pending = [b"", b""]
        self._end_splice(pair, 0, 0)
        self._end_splice(pair, 1, 0)
        self.finished += 1
        self._report(Result(
            pair.conn_id, pair.nbytes[0], pair.nbytes[1], time.monotonic() - pair.start,
            reason, err, pair.is_mptcp, pair.subflows, pair.client,
        ))

    def _bury(self) -> None:
        graveyard, self.graveyard = self.graveyard, []
        for sock in graveyard:
            sock.close()

    def _report(self, result: Result) -> None:
        self.results.append(result)
        self.notify_pending = True


def _try_setsockopt(sock: socket.socket, level: int, opt: int, value) -> None:
    try:
        sock.setsockopt(level, opt, value)
    except OSError:
        pass


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _check_seconds(name: str, value: float, zero_ok: bool) -> None:
    # The same bounds as the compiled engine, which holds times as int64 nanoseconds.
    if not (value >= 0 if zero_ok else value > 0) or not value <= MAX_SECONDS:
        raise ValueError(f"{name} must be {'at least 0' if zero_ok else 'more than 0'} "
                         f"and at most {MAX_SECONDS:g} seconds, not {value}")


class Relay:
    """Worker threads that pump bytes between pairs of sockets; see _relay.pyi."""

    def __init__(self, workers: int = 1, bufsize: int = 131072, idle_timeout: float = 0.0,
                 splice: bool = False, busy_poll: float = 0.0):
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if bufsize < 4096:
            raise ValueError("bufsize must be at least 4096")
        _check_seconds("idle_timeout", idle_timeout, True)
        _check_seconds("busy_poll", busy_poll, True)
        self._results: deque[Result] = deque()
        self._splice = splice
        self._notify_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._workers = [
            _Worker(bufsize, idle_timeout, self._notify_fd, self._results, splice, busy_poll)
            for _ in range(workers)
        ]
        self._closed = False
        self._listener: socket.socket | None = None

    def __reduce__(self):
        raise TypeError("a relay holds fds and cannot be pickled")

    @property
    def notify_fd(self) -> int:
        return self._notify_fd

    @property
    def active(self) -> int:
        return sum(w.active for w in self._workers)

    def add(self, fd_a: int, fd_b: int, conn_id: int, mptcp_fd: int = -1) -> None:
        # Both fds belong to the relay from this call on: if it fails, they are closed.
        socks: list[socket.socket] = []
        try:
            if self._closed:
                raise RuntimeError("the relay is closed")
            if fd_a < 0 or fd_b < 0 or fd_a == fd_b:
                raise ValueError("two distinct open fds are needed")
            for fd in (fd_a, fd_b):
                socks.append(socket.socket(fileno=fd))
            if self._splice:  # a blocking fd would let one splice() hold up the thread
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
        worker.push(_Pair(socks, conn_id, side))

    def new_id(self) -> int:
        return next(_ids)

    def listen(self, fd: int, family: int, sockaddr: tuple, mptcp: bool, mptcp_side: int = -1,
               mark: int = 0, connect_timeout: float = 10.0) -> None:
        if self._closed:
            raise RuntimeError("the relay is closed")
        _check_seconds("connect_timeout", connect_timeout, False)
        self._listener = socket.socket(fileno=fd)  # the caller's fd: detached, never closed
        # accept() in a loop until EAGAIN: a blocking listener would hang the worker
        self._listener.setblocking(False)
        # Accepted sockets inherit TCP_NODELAY: no setsockopt() per client.
        self._listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for w in self._workers:
            w.upstream = (family, sockaddr, 262 if mptcp else 0, mptcp_side, mark,
                          connect_timeout)
            w.listener = self._listener
            w.want_listen = True
            os.eventfd_write(w.wake_fd, 1)

    def unlisten(self) -> None:
        for w in self._workers:
            w.want_listen = False
            os.eventfd_write(w.wake_fd, 1)

    @property
    def listening(self) -> bool:
        return any(w.listening for w in self._workers)

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

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            w.stop()
        self._workers = []
        if self._listener is not None:
            self._listener.detach()
        os.close(self._notify_fd)
        self._notify_fd = -1

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()
