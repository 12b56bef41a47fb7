"""The control plane's accept path, for what needs a decision per connection (a limit, a
name to resolve, transparent mode; a fixed address goes to the relay's own accept): accept,
find the upstream, connect it (connect.Attempt), hand the pair to the relay.

Out of fds or memory it does what the relay's workers do on their fast path: one warning a
second and 100 ms without accepting, the clients beyond waiting in the listen backlog. A
client already accepted when its upstream socket cannot be opened is held (its attempt
tries again) rather than closed, and no other is accepted while one is held.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time

from mptcpproxy import origdst, sockets
from mptcpproxy.config import Config, HostPort
from mptcpproxy.connect import (
    OUT_OF_RESOURCES,
    RETRY_DELAY,
    Attempt,
    Resolved,
    out_of_resources,
    resolve,
)
from mptcpproxy.connlog import Conn, reason
from mptcpproxy.metrics import Metrics, connect_failure_reason
from mptcpproxy.proxyhdr import Origin, ProxyHeaders, conn_record, describe, describe_attempt

log = logging.getLogger("mptcpproxy")

ACCEPT_BATCH = 64  # accepts per wake-up, so set-up tasks get the loop in between


def warn_once(last: dict[str, float], key: str, msg: str, *args) -> None:
    """log.warning, at most once a second for each key (`last` keeps the times)."""
    now = time.monotonic()
    if now - last.get(key, 0.0) >= 1.0:
        last[key] = now
        log.warning(msg, *args)


class Accepting(ProxyHeaders):
    """The accept path of listener.Listener, which owns the state used here."""

    config: Config
    tag: int
    open_count: int
    relay: object  # mptcpproxy.relay.Relay
    listener: socket.socket | None
    conns: dict[int, Conn]
    connecting: set[Attempt]  # and proxyhdr.HeaderRead: clients whose header is awaited
    metrics: Metrics
    transparent: origdst.Transparent | None
    stopping: asyncio.Event | None
    _last_warning: dict[str, float]
    _accept_paused: bool  # out of fds: the listener is left alone for a moment
    _resolving: asyncio.Task | None  # the name of -r, resolved before a batch is accepted

    # -- accept ---------------------------------------------------------------------------

    def _on_accept(self) -> None:
        if self.transparent is None and not self.config.remote.is_literal:
            # -r is a name: resolve it first, then accept the clients waiting by then. A
            # client is accepted only once its upstream addresses are known, so running out
            # of fds leaves the clients in the backlog, not accepted and stuck.
            loop = asyncio.get_running_loop()
            loop.remove_reader(self.listener.fileno())
            self._resolving = loop.create_task(self._resolve_then_accept())
            return
        self._accept_some(None)

    async def _resolve_then_accept(self) -> None:
        resolved: Resolved
        try:
            resolved = await resolve(asyncio.get_running_loop(), self.config.remote)
        except OSError as exc:
            if out_of_resources(exc):
                self._resolving = None
                self._pause_accept("cannot resolve the upstream", exc)
                return
            resolved = exc  # each client of this batch fails with it
        self._resolving = None
        if self.listener is None or self.stopping.is_set():
            return
        self._accept_some(resolved)
        if not self._accept_paused:
            asyncio.get_running_loop().add_reader(self.listener.fileno(), self._on_accept)

    def _accept_some(self, resolved: Resolved | None) -> None:
        assert self.listener is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                self.metrics.accept_error()
                if exc.errno in OUT_OF_RESOURCES:
                    self._pause_accept("cannot accept", exc)
                elif exc.errno not in (errno.ECONNABORTED, errno.EINTR, errno.EPROTO):
                    self._warn_once("accept", "accept failed: %s", os.strerror(exc.errno or 0))
                return
            self.metrics.connection_accepted()
            limit = self.config.max_connections
            if limit and self.open_count >= limit:
                self.metrics.connection_rejected()
                self._warn_once(
                    "limit", "%d connections open (--max-connections): closing new ones", limit
                )
                conn.close()
                continue
            conn.setblocking(False)
            self._set_up(conn, addr, resolved)
            if self._accept_paused:  # that client found no fd for its upstream
                return

    def _pause_accept(self, what: str, exc: OSError) -> None:
        # Out of fds (or memory): leave the listener alone for a moment, the clients beyond
        # wait in its backlog, rather than accept clients that cannot be served (the
        # workers' fast path does the same). One line a second, whatever failed.
        self._warn_once("accept-fds", "%s: %s; pausing accepts for %d ms", what,
                        os.strerror(exc.errno or 0), RETRY_DELAY * 1000)
        if self._accept_paused or self.listener is None:
            return
        self._accept_paused = True
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.listener.fileno())
        loop.call_later(RETRY_DELAY, self._resume_accept)

    def _resume_accept(self) -> None:
        loop = asyncio.get_running_loop()
        if any(attempt.starved for attempt in self.connecting):
            # The fds that come free go to the clients already held first.
            loop.call_later(RETRY_DELAY, self._resume_accept)
            return
        self._accept_paused = False
        if self.listener is not None and not self.stopping.is_set() and self._resolving is None:
            loop.add_reader(self.listener.fileno(), self._on_accept)  # else the task does

    def _warn_once(self, key: str, msg: str, *args) -> None:
        warn_once(self._last_warning, key, msg, *args)

    # -- connection set-up ----------------------------------------------------------------

    def target_for(self, client: socket.socket) -> HostPort:
        """Where to connect for this client: -r, or its original destination (-t)."""
        if self.transparent is None:
            return self.config.remote
        return self.transparent.target_for(client)

    def _set_up(self, client: socket.socket, addr: tuple, resolved: Resolved | None) -> None:
        """A client just accepted: its PROXY header first (--accept-proxy), then upstream."""
        if self.config.accept_proxy:
            self._read_header(client, addr, resolved)
        else:
            self._begin(client, addr, resolved)

    def _begin(self, client: socket.socket, addr: tuple, resolved: Resolved | None,
               origin: Origin | None = None) -> None:
        conn_id = self.relay.new_id()
        try:
            target = self.target_for(client)
        except (origdst.Refused, OSError) as exc:  # OSError: the lookup itself failed
            self.metrics.connect_failed("other")
            client.close()
            if out_of_resources(exc):
                self._pause_accept("cannot look up the original destination", exc)
                return
            log.warning("conn %d from %s: refused: %s", conn_id, describe(addr, origin),
                        f"no original destination ({reason(exc)})"
                        if isinstance(exc, OSError) else exc)
            return
        cfg = self.config
        source = None
        if cfg.source == "client":
            source = self._source_for(conn_id, client, addr, origin)
            if source is None:
                return
        attempt = Attempt(
            asyncio.get_running_loop(), conn_id, client, addr, target, cfg.upstream_mptcp,
            cfg.mark, self._on_connected, self._on_connect_failed, self._on_starved,
            source=source, origin=origin,
        )
        self.connecting.add(attempt)
        attempt.start(cfg.connect_timeout, resolved)

    def _on_starved(self, attempt: Attempt, exc: OSError) -> None:
        # No fd to resolve or connect with: the client is held (the attempt tries again)
        # and no other is accepted for now.
        self._pause_accept("cannot connect upstream", exc)

    def _on_connect_failed(self, attempt: Attempt, exc: BaseException) -> None:
        self.connecting.discard(attempt)
        self.metrics.connect_failed(connect_failure_reason(exc))
        if out_of_resources(exc):  # connect() itself: ENOBUFS, ENOMEM
            self._pause_accept("cannot connect upstream", exc)
            return
        log.warning(
            "conn %d from %s: upstream %s failed: %s%s; closing the client connection",
            attempt.conn_id, describe_attempt(attempt), attempt.target, reason(exc),
            self._failure_hint(exc),
        )

    def _on_connected(self, attempt: Attempt) -> None:
        self.connecting.discard(attempt)  # before the relay counts it: never counted twice
        cfg = self.config
        if cfg.send_proxy and not self._send_header(attempt):
            return
        client, upstream = attempt.client, attempt.upstream
        sockets.set_nodelay(client)
        sockets.set_nodelay(upstream)
        conn_id = attempt.conn_id
        if log.isEnabledFor(logging.DEBUG):
            log.debug("conn %d: %s -> %s established", conn_id,
                      describe_attempt(attempt), sockets.peer_name(attempt.sockaddr))
        mptcp_leg = not cfg.disable_mptcp
        fd_client, fd_up = client.detach(), upstream.detach()
        mptcp_fd = -1 if not mptcp_leg else fd_up if cfg.upstream_mptcp else fd_client
        try:
            self.relay.add(fd_client, fd_up, conn_id, mptcp_fd, tag=self.tag,
                           idle_timeout=cfg.idle_timeout, splice=cfg.splice)
        except (OSError, MemoryError, RuntimeError, ValueError) as exc:
            # Relay.add owns both fds from the call on: it has closed them.
            self.metrics.relay_refused()
            log.warning("conn %d from %s: cannot be relayed: %s; closing both connections",
                        conn_id, describe_attempt(attempt), reason(exc))
            return
        # Its Result is collected on this thread, so never before this entry exists.
        self.conns[conn_id] = conn_record(attempt, mptcp_leg)
