"""Connecting upstream: a non-blocking connect() driven by loop callbacks, with no task
per connection (a task and a wait_for cost more than the whole relay hand-off), every
address of the target tried in turn within one timeout."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable, Iterator

from mptcpproxy import sockets
from mptcpproxy.config import HostPort


async def resolve(loop: asyncio.AbstractEventLoop, target: HostPort) -> list[tuple[int, tuple]]:
    """`(family, sockaddr)` for each address of the target, in getaddrinfo's order."""
    if target.is_literal:
        return [literal(target)]
    infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


def literal(target: HostPort) -> tuple[int, tuple]:
    family = socket.AF_INET6 if ":" in target.host else socket.AF_INET
    return family, (target.host, target.port)


class Attempt:
    """One accepted client whose upstream connection is being made.

    Exactly one of `on_done(attempt)` (then `upstream` and `sockaddr` are set and the
    caller owns both sockets) or `on_fail(attempt, exc)` (both sockets already closed) is
    called, unless `cancel()` comes first.
    """

    __slots__ = (
        "loop", "conn_id", "client", "addr", "target", "mptcp", "mark", "on_done", "on_fail",
        "upstream", "sockaddr", "_addresses", "_timer", "_task", "_error", "_writing",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        conn_id: int,
        client: socket.socket,
        addr: tuple,
        target: HostPort,
        mptcp: bool,
        mark: int | None,
        on_done: Callable[[Attempt], None],
        on_fail: Callable[[Attempt, BaseException], None],
    ) -> None:
        self.loop, self.conn_id, self.client, self.addr = loop, conn_id, client, addr
        self.target, self.mptcp, self.mark = target, mptcp, mark
        self.on_done, self.on_fail = on_done, on_fail
        self.upstream: socket.socket | None = None
        self.sockaddr: tuple = ()
        self._addresses: Iterator[tuple[int, tuple]] = iter(())
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task | None = None
        self._error: BaseException = OSError(errno.EHOSTUNREACH, "no address to connect to")
        self._writing = False

    def start(self, timeout: float) -> None:
        self._timer = self.loop.call_later(timeout, self._timed_out)
        if self.target.is_literal:
            self._addresses = iter((literal(self.target),))
            self._next()
        else:
            self._task = self.loop.create_task(self._resolve())

    async def _resolve(self) -> None:
        try:
            addresses = await resolve(self.loop, self.target)
        except OSError as exc:
            self._task = None
            self._fail(exc)
            return
        self._task = None
        self._addresses = iter(addresses)
        self._next()

    def _next(self) -> None:
        for family, sockaddr in self._addresses:
            try:
                sock = sockets.stream_socket(family, self.mptcp, self.mark)
            except OSError as exc:
                self._error = exc
                continue
            err = sock.connect_ex(sockaddr)
            if err in (0, errno.EINPROGRESS):
                self.upstream, self.sockaddr = sock, sockaddr
                if err == 0:
                    self._succeed()
                else:
                    self.loop.add_writer(sock.fileno(), self._on_writable)
                    self._writing = True
                return
            sock.close()
            self._error = OSError(err, os.strerror(err))
        self._fail(self._error)

    def _on_writable(self) -> None:
        sock = self.upstream
        self._stop_writing()
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0:
            self._succeed()
            return
        sock.close()
        self.upstream = None
        self._error = OSError(err, os.strerror(err))
        self._next()

    def _stop_writing(self) -> None:
        if self._writing:
            self.loop.remove_writer(self.upstream.fileno())
            self._writing = False

    def _succeed(self) -> None:
        self._timer.cancel()
        self.on_done(self)

    def _fail(self, exc: BaseException) -> None:
        self._close()
        self.on_fail(self, exc)

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(TimeoutError("timed out"))

    def _close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()
        if self.upstream is not None:
            self._stop_writing()
            self.upstream.close()
        self.client.close()

    def cancel(self) -> None:
        """Give up (a drain): both sockets are closed, no callback follows."""
        self._close()
