"""The pure-Python twin's accept + connect in the worker (Relay.listen), for any number of
listeners. A mixin of `_relay_py._Worker`; keep it in step with `_relay_accept.pxi`."""

from __future__ import annotations

import errno as E
import itertools
import select
import socket
import threading
from dataclasses import dataclass

from mptcpproxy.relay._relay_py_pump import _Pair
from mptcpproxy.relay._results import ACCEPT_ERROR, FAILED, Result

ACCEPT_BATCH = 64
MAX_LISTENERS = 128
OUT_OF_RESOURCES = (E.EMFILE, E.ENFILE, E.ENOBUFS, E.ENOMEM)
_ids = itertools.count(1)  # connection ids, shared by every relay (next() holds the GIL)


@dataclass(frozen=True)
class ListenCfg:
    """What a worker does with the clients of one listener."""

    family: int
    sockaddr: tuple
    proto: int
    mptcp_side: int
    mark: int
    connect_timeout: float
    tag: int
    idle: float
    splice: bool


class _Listen:
    """One listener in one worker. The control thread sets `want`/`cfg` under the worker's
    lock; the worker alone registers it, and drops the entry once it let go (`want` off
    and out of its epoll set)."""

    __slots__ = ("sock", "cfg", "want", "listening", "resume_at")

    def __init__(self, sock: socket.socket, cfg: ListenCfg) -> None:
        self.sock, self.cfg = sock, cfg
        self.want, self.listening, self.resume_at = True, False, 0.0


def try_setsockopt(sock: socket.socket, level: int, opt: int, value) -> None:
    try:
        sock.setsockopt(level, opt, value)
    except OSError:
        pass


class Accept:
    """Needs from the worker: `ep`, `lock`, `total`, `accepted`, `accept_errors`, and
    `_register`, `_finish`, `_fail`, `_report`."""

    lock: threading.Lock
    listeners: dict[int, _Listen]  # fd -> entry
    held: set[_Pair]  # accepted clients waiting for an fd for their upstream
    accepted_by_tag: dict[int, int]

    # -- the control thread's side (under the lock) ---------------------------------------

    def set_listen(self, sock: socket.socket, cfg: ListenCfg) -> bool:
        """Listen on `sock` (again: new settings for new clients); False when full."""
        with self.lock:
            entry = self.listeners.get(sock.fileno())
            if entry is None:
                if len(self.listeners) >= MAX_LISTENERS:
                    return False
                self.listeners[sock.fileno()] = _Listen(sock, cfg)
            else:
                entry.cfg, entry.want = cfg, True
        return True

    def set_unlisten(self, fd: int | None) -> None:
        with self.lock:
            for entry_fd, entry in self.listeners.items():
                if fd is None or entry_fd == fd:
                    entry.want = False

    def holds(self, fd: int | None) -> bool:
        with self.lock:
            return any(fd is None or entry_fd == fd for entry_fd in self.listeners)

    # -- the worker's side ----------------------------------------------------------------

    def _sync_listener(self, now: float) -> bool:
        """Every listener in step with the control plane's wishes; True while a wanted one
        is paused. A failing epoll_ctl is tried again at the next scan: the worker thread
        must not die of it (its pairs would hang)."""
        paused = False
        with self.lock:
            for fd, entry in list(self.listeners.items()):
                try:
                    if entry.want and not entry.listening and now >= entry.resume_at:
                        self.ep.register(fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
                        entry.listening = True
                    elif entry.listening and (not entry.want or now < entry.resume_at):
                        self.ep.unregister(fd)
                        entry.listening = False
                except (OSError, ValueError):
                    pass
                if not entry.want and not entry.listening:
                    del self.listeners[fd]  # let go
                paused |= entry.want and not entry.listening
        self.paused = paused
        return paused

    def _pause_accepting(self, entry: _Listen, now: float) -> None:
        self.accept_errors += 1  # leave the listener alone for 100 ms
        entry.resume_at = now + 0.1
        self._sync_listener(now)

    def _accept_some(self, entry: _Listen, now: float) -> None:
        cfg = entry.cfg
        for _ in range(ACCEPT_BATCH):
            if self.held:  # the fds that come free go to the clients already held first
                self._pause_accepting(entry, now)
                return
            try:
                client, addr = entry.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in OUT_OF_RESOURCES:
                    self._pause_accepting(entry, now)
                    self._report(Result(0, 0, 0, 0.0, ACCEPT_ERROR, exc.errno, False, 0,
                                        None, cfg.tag))
                    return
                continue  # ECONNABORTED and the like: that client is gone already
            self.accepted += 1
            self.accepted_by_tag[cfg.tag] = self.accepted_by_tag.get(cfg.tag, 0) + 1
            client.setblocking(False)
            pair = _Pair([client, None], next(_ids), cfg.mptcp_side, addr[:2], cfg.tag,
                         cfg.idle, cfg.splice, cfg.connect_timeout)
            pair.upstream = cfg.sockaddr[:2]
            with self.lock:
                self.total += 1
            self.count_open(pair.tag, 1)
            if self._connect_upstream(pair, cfg, now):
                # No fd for the upstream: the client is held (the scan tries again) and no
                # other is accepted until it has one; clients beyond wait in the backlog.
                pair.held, pair.connecting = cfg, True
                self.held.add(pair)
                self._pause_accepting(entry, now)
                return

    def _connect_upstream(self, pair: _Pair, cfg: ListenCfg, now: float) -> bool:
        """Open the upstream socket and start connecting (or finish the pair as failed);
        True when there is no fd or memory for the socket (the pair is untouched)."""
        try:
            up = socket.socket(cfg.family, socket.SOCK_STREAM, cfg.proto)
        except OSError as exc:
            if exc.errno in OUT_OF_RESOURCES:
                return True
            self._finish(pair, FAILED, exc.errno or 0)
            return False
        pair.socks[1] = up
        try:
            up.setblocking(False)
            if cfg.mark:  # as the compiled engine: a refused mark is not fatal here
                try_setsockopt(up, socket.SOL_SOCKET, socket.SO_MARK, cfg.mark)
            # No Nagle delay added by the relay (the client has it from the listener).
            try_setsockopt(up, socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = up.connect_ex(cfg.sockaddr)
        except OSError as exc:
            err = exc.errno or E.EINVAL
        if err not in (0, E.EINPROGRESS):
            self._finish(pair, FAILED, err)
            return False
        pair.connecting = True  # even when done already: EPOLLOUT follows at once
        self._register(pair, now)
        return False

    def _retry_held(self, pair: _Pair, now: float) -> None:
        """A held client (no fd for its upstream when accepted): try again, within its
        connect timeout."""
        if now - pair.start >= pair.connect_timeout:
            self._finish(pair, FAILED, E.ETIMEDOUT)
        elif not self._connect_upstream(pair, pair.held, now):
            self._release_held(pair)

    def _release_held(self, pair: _Pair) -> None:
        if pair.held is not None:
            pair.held = None
            self.held.discard(pair)

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
        pair.sample_mptcp(None, status=True)
        return False
