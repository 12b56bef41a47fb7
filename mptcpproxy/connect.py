"""Connecting upstream: a non-blocking connect() driven by loop callbacks, with no task
per connection (a task and a wait_for cost more than the whole relay hand-off), every
address of the target tried in turn within one timeout. Out of fds, an attempt waits and
tries again instead of failing its client."""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import socket
from collections.abc import Callable, Iterator

from mptcpproxy import sockets
from mptcpproxy.config import HostPort

# errno of a call that failed for want of fds or memory: the same call may work a moment later
OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
RETRY_DELAY = 0.1  # seconds an attempt starved of fds waits before it tries again

# A target resolved by the caller: its (family, sockaddr) list, or the error resolving it.
Resolved = list[tuple[int, tuple]] | OSError


def out_of_resources(exc: BaseException) -> bool:
    # A resolver starved of fds raises OSError(EMFILE), not a gaierror (EAI_SYSTEM).
    return (isinstance(exc, OSError) and not isinstance(exc, socket.gaierror)
            and exc.errno in OUT_OF_RESOURCES)


async def resolve(loop: asyncio.AbstractEventLoop, target: HostPort) -> list[tuple[int, tuple]]:
    """`(family, sockaddr)` for each address of the target, in getaddrinfo's order."""
    if target.is_literal:
        return [literal(target)]
    infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


def literal(target: HostPort) -> tuple[int, tuple]:
    """`(family, sockaddr)` of an IP address target. A scope (fe80::1%eth0) becomes the
    interface's index in the sockaddr, as the relay's own connect() needs it; OSError
    when no interface has that name."""
    if ":" not in target.host:
        return socket.AF_INET, (target.host, target.port)
    host, _, scope = target.host.partition("%")
    return socket.AF_INET6, (host, target.port, 0, scope_id(scope) if scope else 0)


def scope_id(scope: str) -> int:
    """The interface index of an IPv6 scope: a number, or an interface's name."""
    if scope.isdigit():
        return int(scope)
    try:
        return socket.if_nametoindex(scope)
    except OSError:
        raise OSError(errno.ENODEV, f"no interface is named '{scope}'") from None


class Attempt:
    """One accepted client whose upstream connection is being made.

    Exactly one of `on_done(attempt)` (then `upstream` and `sockaddr` are set and the
    caller owns both sockets) or `on_fail(attempt, exc)` (both sockets already closed) is
    called, unless `cancel()` comes first. When resolving or opening the upstream socket
    fails for want of fds or memory, `on_starved(attempt, exc)` is called (if given) and the
    attempt holds its client and tries again after RETRY_DELAY, within the same timeout.
    `source`: the host to connect from, an address of another host (--source client);
    `origin`: the caller's own record of the client (proxyhdr.Origin), carried along.
    """

    __slots__ = (
        "loop", "conn_id", "client", "addr", "target", "mptcp", "mark", "on_done", "on_fail",
        "on_starved", "upstream", "sockaddr", "_addresses", "_timer", "_task", "_retry",
        "_error", "_writing", "source", "origin",
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
        on_starved: Callable[[Attempt, OSError], None] | None = None,
        *,
        source: str | None = None,
        origin: object = None,
    ) -> None:
        self.loop, self.conn_id, self.client, self.addr = loop, conn_id, client, addr
        self.target, self.mptcp, self.mark = target, mptcp, mark
        self.on_done, self.on_fail, self.on_starved = on_done, on_fail, on_starved
        self.source, self.origin = source, origin
        self.upstream: socket.socket | None = None
        self.sockaddr: tuple = ()
        self._addresses: Iterator[tuple[int, tuple]] = iter(())
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._error: BaseException = OSError(errno.EHOSTUNREACH, "no address to connect to")
        self._writing = False

    @property
    def starved(self) -> bool:
        """Waiting for an fd (or memory) to resolve or connect with."""
        return self._retry is not None

    def start(self, timeout: float, resolved: Resolved | None = None) -> None:
        """Connect within `timeout` seconds; `resolved`: the target's addresses (or the
        error resolving it) when the caller resolved it already."""
        self._timer = self.loop.call_later(timeout, self._timed_out)
        if isinstance(resolved, OSError):
            self._fail(resolved)
        elif resolved is not None:
            self._addresses = iter(resolved)
            self._next()
        elif self.target.is_literal:
            self._addresses = iter((literal(self.target),))
            self._next()
        else:
            self._start_resolving()

    def _start_resolving(self) -> None:
        self._retry = None
        self._task = self.loop.create_task(self._resolve())

    async def _resolve(self) -> None:
        try:
            addresses = await resolve(self.loop, self.target)
        except OSError as exc:
            self._task = None
            if not self._starved(exc, self._start_resolving):
                self._fail(exc)
            return
        self._task = None
        self._addresses = iter(addresses)
        self._next()

    def _starved(self, exc: OSError, again: Callable[[], None]) -> bool:
        # Out of fds: keep the client (a closed one would be a failed connection, a waiting
        # one is only late) and call `again` in a moment.
        if self.on_starved is None or not out_of_resources(exc):
            return False
        self._retry = self.loop.call_later(RETRY_DELAY, again)
        self.on_starved(self, exc)
        return True

    def _next(self) -> None:
        self._retry = None
        for family, sockaddr in self._addresses:
            try:
                sock = sockets.stream_socket(family, self.mptcp, self.mark)
            except OSError as exc:
                if self._starved(exc, self._next):  # this address again, then the rest
                    self._addresses = itertools.chain(((family, sockaddr),), self._addresses)
                    return
                self._error = exc
                continue
            if self.source is not None:
                try:
                    sockets.bind_transparent(sock, family, self.source)
                except OSError as exc:  # another family, or no CAP_NET_ADMIN any more
                    sock.close()
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
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self.upstream is not None:
            self._stop_writing()
            self.upstream.close()
        self.client.close()

    def cancel(self) -> None:
        """Give up (a drain): both sockets are closed, no callback follows."""
        self._close()
