"""What the relay reports, handled on the control plane: each Result dispatched to its
listener (by tag) for its log line and metrics, connect failures and accept errors as
such, and the listeners a reload retired, closed and forgotten once their pairs ended.
A mixin of control.Proxy, which owns the state used here."""

from __future__ import annotations

import asyncio
import errno
import logging
import os

from mptcpproxy import connlog, sockets
from mptcpproxy.accepting import warn_once
from mptcpproxy.connect import OUT_OF_RESOURCES, literal
from mptcpproxy.connlog import Conn, reason
from mptcpproxy.listener import Listener
from mptcpproxy.metrics import connect_failure_reason
from mptcpproxy.relay._results import ACCEPT_ERROR, FAILED, Result

log = logging.getLogger("mptcpproxy")


class Results:
    relay: object  # mptcpproxy.relay.Relay
    by_tag: dict[int, Listener]
    retired: list[Listener]
    conns: dict[int, Conn]
    stopping: asyncio.Event | None
    joinwatch: object | None  # joinwatch.JoinWatch
    _collects: int
    _retired_timer: asyncio.TimerHandle | None
    _last_warning: dict[str, float]

    def _on_results(self) -> None:
        # Every collect goes through here, the drain's last one too: a connect failure is
        # never reported as a closed connection, an accept error never dropped.
        # The connection-end lines are written together (connlog.log_ends), those before
        # another log line first.
        self._collects += 1
        ends: list[tuple[Result, Conn]] = []
        for result in self.relay.collect():
            lst = self.by_tag.get(result.tag)
            if lst is None:
                continue
            if result.reason == FAILED:
                connlog.log_ends(ends)
                ends.clear()
                self._log_failed(lst, result)
            elif result.reason == ACCEPT_ERROR:
                connlog.log_ends(ends)
                ends.clear()
                lst.metrics.accept_error()
                self._warn_once("accept-fds", "cannot accept: %s; pausing accepts for 100 ms",
                                os.strerror(result.errno))
            else:
                self._log_result(lst, result, ends)
        connlog.log_ends(ends)
        if self.retired and self._retired_timer is None:
            self._close_retired()

    def _warn_once(self, key: str, msg: str, *args) -> None:
        warn_once(self._last_warning, key, msg, *args)

    def _log_failed(self, lst: Listener, r: Result) -> None:
        # A connection the relay accepted itself whose upstream could not be reached.
        exc = TimeoutError("timed out") if r.errno == errno.ETIMEDOUT else OSError(
            r.errno, os.strerror(r.errno))
        lst.metrics.connect_failed(connect_failure_reason(exc))
        if r.errno in OUT_OF_RESOURCES:  # a burst of these: one line a second is enough
            self._warn_once("accept-fds", "cannot accept: %s; closing new connections and "
                            "pausing accepts for 100 ms", os.strerror(r.errno))
            return
        log.warning(
            "conn %d from %s: upstream %s failed: %s; closing the client connection",
            r.conn_id, sockets.peer_name(r.client), lst.config.remote, reason(exc),
        )

    def _log_result(self, lst: Listener, r: Result, ends: list[tuple[Result, Conn]]) -> None:
        conn = self.conns.pop(r.conn_id, None)
        if conn is None:
            if r.client is None:
                return
            c = lst.config  # accepted by the relay itself: -r is the upstream
            conn = Conn(r.client, literal(c.remote)[1], not c.disable_mptcp)
        lst.metrics.connection_closed(r, conn.mptcp_leg)
        if self.joinwatch is not None:
            self.joinwatch.connection_ended(r, conn.mptcp_leg)
        ends.append((r, conn))

    def _close_retired(self) -> None:
        # A listener a reload removed closes once its last connection has ended; one it
        # replaced, as soon as the workers let go of it (after a sweep of its backlog). It
        # is forgotten (its tag free again) only after a collect that followed: its pairs'
        # Results are all in by then. Polled while any is left.
        self._retired_timer = None
        for lst in list(self.retired):
            if (lst.listener is not None and not lst.held_by_workers
                    and (lst.handing_over or lst.open_count == 0)):
                if lst.handing_over and lst.sweep_on_close:
                    lst.sweep()
                lst.close()
                log.info("listener %s: %s", lst.title, "handed over to its new socket"
                         if lst.handing_over else "closed, its last connection ended")
            if lst.listener is None and lst.open_count == 0 and not self.stopping.is_set():
                if lst.gone_at is None:
                    lst.gone_at = self._collects
                elif self._collects > lst.gone_at:
                    self.retired.remove(lst)
                    self.by_tag.pop(lst.tag, None)
        if self.retired and not self.stopping.is_set():
            self._retired_timer = asyncio.get_running_loop().call_later(
                0.02, self._poll_retired)

    def _poll_retired(self) -> None:
        self._retired_timer = None
        self._on_results()

