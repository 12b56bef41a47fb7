"""Keeping the client's address on the control plane's accept path (issue 12):
`--accept-proxy` reads a PROXY header from each client (HeaderRead), `--send-proxy` writes
one on each upstream connection, `--source client` connects from the client's address
(srcaddr.py has its checks). `ProxyHeaders` is the part of accepting.Accepting that does it.

A client's header is read without a task, as connect.Attempt connects: a loop reader and
one timer for the whole header (--proxy-timeout). While it is read the client is in the
listener's `connecting` set, so it counts against --max-connections and a stop or drain
cancels it like an attempt.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable

from mptcpproxy import sockets, srcaddr
from mptcpproxy.connlog import Conn, reason
from mptcpproxy.origdst import plain
from mptcpproxy.proxyproto import (
    DEFAULT_MAX_V2,
    REASONS,
    Header,
    ProxyHeaderError,
    encode_v1,
    encode_v2,
    parse,
)

log = logging.getLogger("mptcpproxy")

#: Why a client was closed under --accept-proxy: the parser's reasons, the deadline, a
#: client that closed (or reset) before its header was complete, and one that closed
#: without sending a byte (a load balancer's connect-only health check). The metric's
#: label set.
ERROR_REASONS = (*REASONS, "timeout", "closed", "empty")


class Origin:
    """Who a connection is from, by its accepted PROXY header: `client` is the header's
    source, `via` the peer that sent the header, `dst` the header's destination (each a
    (host, port) with IPv4-mapped IPv6 as IPv4)."""

    __slots__ = ("client", "via", "dst")

    def __init__(self, client: tuple, via: tuple, dst: tuple) -> None:
        self.client, self.via, self.dst = client, via, dst


def origin_of(header: Header, peer: tuple) -> Origin | None:
    """None when the header names no client (LOCAL, UNKNOWN, AF_UNSPEC, AF_UNIX: a health
    check or a proxy that does not know): the connection keeps its real endpoints."""
    if header.source is None or header.destination is None:
        return None
    return Origin(plain(header.source), plain(peer), plain(header.destination))


class HeaderRead:
    """One accepted client whose PROXY header is being read.

    Each readable event peeks at what has arrived and parses it after what was consumed
    before. The parser answers NeedMore only for a proper prefix of a header, so those bytes
    are all header bytes: they are consumed (a level-triggered reader would otherwise fire
    again for them). A complete header is consumed to its exact length; the application
    data behind it, in the same segment or not, stays in the socket for the relay.

    Exactly one of `on_done(read, header)` (the caller then owns `client`) or
    `on_fail(read, reason, message)` (`client` already closed; reason from ERROR_REASONS)
    is called, unless `cancel()` comes first.
    """

    __slots__ = ("loop", "client", "addr", "resolved", "on_done", "on_fail", "_buf", "_timer",
                 "_timeout")
    starved = False  # never waiting for an fd: a member of `connecting` with the Attempts

    def __init__(self, loop: asyncio.AbstractEventLoop, client: socket.socket, addr: tuple,
                 resolved: object, on_done: Callable[[HeaderRead, Header], None],
                 on_fail: Callable[[HeaderRead, str, str], None]) -> None:
        self.loop, self.client, self.addr, self.resolved = loop, client, addr, resolved
        self.on_done, self.on_fail = on_done, on_fail
        self._buf = b""  # the header bytes consumed so far
        self._timer: asyncio.TimerHandle | None = None
        self._timeout = 0.0

    def start(self, timeout: float) -> None:
        """Read the header within `timeout` seconds, all of it."""
        self._timeout = timeout
        self._timer = self.loop.call_later(timeout, self._timed_out)
        self.loop.add_reader(self.client.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        data = self._peek(DEFAULT_MAX_V2 - len(self._buf))
        if not data:  # none yet, or the connection ended (_peek failed it)
            return
        try:
            result = parse(self._buf + data)
        except ProxyHeaderError as exc:
            self._fail(exc.reason, str(exc))
            return
        # all of a prefix, or the header to its last byte; never a byte of the data behind
        take = result.length - len(self._buf) if isinstance(result, Header) else len(data)
        try:
            got = self.client.recv(take)
        except OSError:
            got = b""
        if len(got) != take:  # what was peeked is queued: only a failing socket gives less
            self._fail("closed", f"the client's connection failed {self._progress()}")
            return
        self._buf += got
        if isinstance(result, Header):
            self._finish()
            self.on_done(self, result)

    def _peek(self, size: int) -> bytes | None:
        """Up to `size` queued bytes, left in the queue; None when there are none yet; b""
        when the client's connection ended (closed or reset), which fails the read:
        "closed", or "empty" before its first byte."""
        try:
            data = self.client.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            why = f"the client's connection failed ({os.strerror(exc.errno or 0).lower()})"
        else:
            if data:
                return data
            why = "the client closed the connection"
        self._fail("closed" if self._buf else "empty", f"{why} {self._progress()}")
        return b""

    def _progress(self) -> str:
        return f"before a complete PROXY header ({len(self._buf)} bytes of it arrived)"

    def _timed_out(self) -> None:
        self._timer = None
        # Look first: uvloop drops the reader of a socket whose first event carries an
        # error (a byte, then a reset, before the first read), without calling it.
        if self._peek(1) == b"":
            return  # the connection ended: _peek said how
        self._fail("timeout", f"no complete PROXY header within {self._timeout:g} s "
                              f"({len(self._buf)} bytes of it arrived; --proxy-timeout)")

    def _finish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.loop.remove_reader(self.client.fileno())

    def _fail(self, reason: str, message: str) -> None:
        self.cancel()
        self.on_fail(self, reason, message)

    def cancel(self) -> None:
        """Give up (a stop or drain): the client is closed, no callback follows."""
        self._finish()
        self.client.close()


class ProxyHeaders:
    """--accept-proxy, --send-proxy and --source client: the part of accepting.Accepting
    that reads, writes and uses PROXY headers. Accepting owns the state used here."""

    def _read_header(self, client: socket.socket, addr: tuple, resolved) -> None:
        read = HeaderRead(asyncio.get_running_loop(), client, addr, resolved,
                          self._on_header, self._on_header_error)
        self.connecting.add(read)
        read.start(self.config.proxy_timeout)

    def _on_header(self, read: HeaderRead, header: Header) -> None:
        self.connecting.discard(read)
        self._begin(read.client, read.addr, read.resolved, origin_of(header, read.addr))

    def _on_header_error(self, read: HeaderRead, reason: str, message: str) -> None:
        self.connecting.discard(read)
        self.metrics.proxy_header_error(reason)
        if reason == "empty":  # a health check's connect and close: counted, not a warning
            log.debug("connection from %s closed without a byte (--accept-proxy)",
                      sockets.peer_name(read.addr))
            return
        # anyone can connect and send garbage: one line a second at most
        self._warn_once("proxy-header", "connection from %s closed without a reply: %s "
                        "(--accept-proxy; one such line a second at most)",
                        sockets.peer_name(read.addr), message)

    # -- --source client --------------------------------------------------------------------

    def _source_for(self, conn_id: int, client: socket.socket, addr: tuple,
                    origin: Origin | None) -> str | None:
        """The host to connect from, or None when the claimed client address must not be
        used (then the client is closed, counted and logged)."""
        host = (origin.client if origin is not None else plain(addr))[0]
        why = srcaddr.refusal(host)
        if why is None:
            return host
        client.close()
        self.metrics.connect_failed("other")
        self._warn_once("source", "conn %d from %s: refused: --source client cannot connect "
                        "from %s, %s; closing the client connection", conn_id,
                        describe(addr, origin), host, why)
        return None

    def _failure_hint(self, exc: BaseException) -> str:
        timed_out = isinstance(exc, TimeoutError) or (
            isinstance(exc, OSError) and exc.errno == errno.ETIMEDOUT)
        if self.config.source != "client" or not timed_out:
            return ""
        return (" (--source client: the service's replies to the client's address do not "
                "come back to this proxy: install the rules of --setup-firewall, see "
                "--print-firewall, and route the clients' addresses to this host on the "
                "service's side)")

    # -- --send-proxy -----------------------------------------------------------------------

    def _send_header(self, attempt) -> bool:
        """Write the PROXY header on the just connected upstream; False when it could not
        be written whole (both sockets are then closed, the failure counted and logged)."""
        try:
            data = self._header_bytes(attempt)
            # A new connection's send buffer is empty: a header of a few hundred bytes at
            # most goes at once, or the connection is failing. Never retried behind the
            # relay's back.
            sent = attempt.upstream.send(data)
        except OSError as exc:
            why = reason(exc)
        else:
            if sent == len(data):
                return True
            why = f"only {sent} of its {len(data)} bytes were taken"
        attempt.upstream.close()
        attempt.client.close()
        self.metrics.connect_failed("other")
        log.warning("conn %d from %s: cannot send the PROXY header to %s: %s; closing the "
                    "client connection", attempt.conn_id, describe_attempt(attempt),
                    attempt.target, why)
        return False

    def _header_bytes(self, attempt) -> bytes:
        origin: Origin | None = attempt.origin
        if origin is not None:  # pass on what the accepted header said
            src, dst = origin.client, origin.dst
        else:
            src, target = attempt.addr, attempt.target
            if self.transparent is not None and target != self.transparent.fallback:
                dst = (target.host, target.port)  # the original destination (-t)
            else:
                dst = attempt.client.getsockname()  # the listener's address
        return (encode_v1 if self.config.send_proxy == "v1" else encode_v2)(src, dst)


def describe(addr: tuple, origin: Origin | None) -> str:
    """The client for a log line: `host:port`, or `client via peer` after a header."""
    if origin is None:
        return sockets.peer_name(addr)
    return f"{sockets.peer_name(origin.client)} via {sockets.peer_name(origin.via)}"


def describe_attempt(attempt) -> str:
    return describe(attempt.addr, attempt.origin)


def conn_record(attempt, mptcp_leg: bool) -> Conn:
    """The record logged at the connection's end: the header's client, `via` its sender."""
    origin: Origin | None = attempt.origin
    if origin is None:
        return Conn(attempt.addr, attempt.sockaddr, mptcp_leg)
    return Conn(origin.client, attempt.sockaddr, mptcp_leg, origin.via)
