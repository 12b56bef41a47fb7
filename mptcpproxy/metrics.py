"""Prometheus metrics: counters the control plane updates once per connection, and an
asyncio HTTP endpoint (`--metrics HOST:PORT`) serving them in the text exposition format.

No dependency: the format is a few lines of text. Nothing here runs per byte: bytes are
added when a connection ends (from the relay's Result), and the relay's live per-worker
counters are read only when Prometheus scrapes.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from mptcpproxy.relay._results import ABORTED, CLOSED, ERROR, RESET, TIMEOUT, Result, WorkerStats

CLOSE_REASONS = (CLOSED, RESET, TIMEOUT, ERROR, ABORTED)  # how a relayed connection ends

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CONNECT_FAILURES = ("refused", "timeout", "unreachable", "resolve", "other")
SUBFLOW_BUCKETS = (1, 2, 3, 4, 5, 6, 8)  # subflows of one connection, the first included
REQUEST_TIMEOUT = 5.0  # seconds a scraper may take to send its request
MAX_REQUEST = 8192  # bytes of request line and headers

_UNREACHABLE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN,
                errno.EADDRNOTAVAIL}


def connect_failure_reason(exc: BaseException) -> str:
    """The `reason` label for an exception from resolving or connecting upstream."""
    if isinstance(exc, socket.gaierror):
        return "resolve"
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):  # distinct types before 3.11
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, OSError) and exc.errno in _UNREACHABLE:
        return "unreachable"
    if isinstance(exc, OSError) and exc.errno == errno.ETIMEDOUT:
        return "timeout"
    return "other"


class Metrics:
    """Counters of one proxy process. Call from the event loop thread only."""

    def __init__(self, active: Callable[[], int] | None = None,
                 worker_stats: Callable[[], Sequence[WorkerStats]] | None = None) -> None:
        # Both are read at scrape time, from the control plane's own state, so they cannot
        # drift: `active` counts connections connecting upstream or relayed, `worker_stats`
        # is Relay.stats. A series whose source is None is left out.
        self.active = active
        self.worker_stats = worker_stats
        self.start_time = time.time()
        self.accepted = 0
        self.accept_errors = 0
        self.rejected = 0  # over --max-connections
        self.closed: Counter[str] = Counter()  # by Result.reason
        self.connect_failures: Counter[str] = Counter()  # by CONNECT_FAILURES
        self.client_to_upstream = 0
        self.upstream_to_client = 0
        self.mptcp_leg: Counter[str] = Counter()  # "mptcp" / "fallback"
        self.subflows: Counter[int] = Counter()  # connections by subflow count (MPTCP only)
        self.reloads: Counter[str] = Counter()  # configuration reloads by result

    # -- the control plane's calls, once per event --------------------------------------------

    def connection_accepted(self) -> None:
        self.accepted += 1

    def config_reload(self, result: str) -> None:
        """A reload of the configuration file: result "success" or "failure"."""
        self.reloads[result] += 1

    def accept_error(self) -> None:
        self.accept_errors += 1

    def connection_rejected(self) -> None:
        """An accepted connection closed at once because --max-connections was reached."""
        self.rejected += 1

    def connect_failed(self, reason: str) -> None:
        """An accepted connection dropped because its upstream could not be reached."""
        self.connect_failures[reason if reason in CONNECT_FAILURES else "other"] += 1

    def relay_refused(self) -> None:
        """A connection set up at both ends that Relay.add() could not take: it ends as an
        error, before any byte."""
        self.closed[ERROR] += 1

    def connection_closed(self, result: Result, mptcp_leg: bool) -> None:
        """A relayed pair ended; the client socket was Relay.add()'s fd_a. `mptcp_leg`: one
        leg was meant to be MPTCP (add()'s mptcp_fd was not -1)."""
        self.closed[result.reason] += 1
        self.client_to_upstream += result.bytes_ab
        self.upstream_to_client += result.bytes_ba
        if mptcp_leg:
            self.mptcp_leg["mptcp" if result.is_mptcp else "fallback"] += 1
            if result.is_mptcp:
                self.subflows[result.subflows] += 1

    # -- the exposition -----------------------------------------------------------------------

    def render(self) -> str:
        """The metrics in the Prometheus text exposition format 0.0.4."""
        out: list[str] = []

        def family(name: str, kind: str, help_: str,
                   samples: Iterable[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

        family("mptcpproxy_start_time_seconds", "gauge",
               "Start time of the process since the Unix epoch.", [("", self.start_time)])
        live = self._read_live()
        # Accepted by the relay workers themselves (the fast path) count live, from their stats.
        accepted = self.accepted + sum(w.accepted for w in live[1]) if live else self.accepted
        family("mptcpproxy_connections_accepted_total", "counter",
               "Connections accepted from clients.", [("", accepted)])
        family("mptcpproxy_connections_closed_total", "counter",
               "Relayed connections that ended, by how they ended.",
               [(_labels(reason=r), self.closed[r]) for r in _keys(CLOSE_REASONS, self.closed)])
        family("mptcpproxy_connections_rejected_total", "counter",
               "Connections closed at once because --max-connections was reached.",
               [("", self.rejected)])
        family("mptcpproxy_accept_errors_total", "counter",
               "accept() calls on the listening socket that failed.", [("", self.accept_errors)])
        family("mptcpproxy_upstream_connect_failures_total", "counter",
               "Connections dropped because the upstream could not be reached, by reason.",
               [(_labels(reason=r), self.connect_failures[r])
                for r in _keys(CONNECT_FAILURES, self.connect_failures)])
        family("mptcpproxy_bytes_total", "counter",
               "Bytes relayed, by direction; added when a connection ends.",
               [(_labels(direction="client_to_upstream"), self.client_to_upstream),
                (_labels(direction="upstream_to_client"), self.upstream_to_client)])
        family("mptcpproxy_mptcp_leg_connections_total", "counter",
               "Ended connections whose MPTCP leg really used MPTCP, or fell back to TCP.",
               [(_labels(result=r), self.mptcp_leg[r]) for r in ("mptcp", "fallback")])
        self._render_subflows(family)
        self._render_live(family, live)
        return "\n".join(out) + "\n"

    def _render_subflows(self, family: Callable[..., None]) -> None:
        samples = []
        for bound in SUBFLOW_BUCKETS:
            count = sum(n for k, n in self.subflows.items() if k <= bound)
            samples.append((_labels(le=str(bound)), count))
        total = sum(self.subflows.values())
        samples.append((_labels(le="+Inf"), total))
        # the sample "labels" carry the _bucket/_sum/_count suffixes of the histogram
        family("mptcpproxy_mptcp_subflows", "histogram",
               "Most subflows each ended MPTCP connection had, the first included.",
               [(f"_bucket{labels}", n) for labels, n in samples]
               + [("_sum", sum(k * n for k, n in self.subflows.items())), ("_count", total)])

    def _read_live(self) -> tuple[int | None, list[WorkerStats]] | None:
        try:
            active = self.active() if self.active else None
            stats = list(self.worker_stats()) if self.worker_stats else []
        except Exception:  # a scrape must not take the proxy down; say why, per scrape
            log.exception("cannot read the live connection counts")
            return None
        return active, stats

    def _render_live(self, family: Callable[..., None],
                     live: tuple[int | None, list[WorkerStats]] | None) -> None:
        if live is None:
            return
        active, stats = live
        if active is not None:
            family("mptcpproxy_connections_active", "gauge",
                   "Connections open now: connecting upstream or relayed.",
                   [("", _count(active))])
        if not stats:
            return
        for name, kind, field, help_ in (
            ("mptcpproxy_worker_active_pairs", "gauge", "active", "Pairs a relay worker "
             "holds now."),
            ("mptcpproxy_worker_pairs_total", "counter", "pairs", "Pairs handed to a relay "
             "worker."),
            ("mptcpproxy_worker_bytes_total", "counter", "bytes", "Bytes a relay worker "
             "moved, both directions, live."),
        ):
            family(name, kind, help_, [(_labels(worker=str(i)), _count(getattr(s, field)))
                                       for i, s in enumerate(stats)])


def _count(value: int) -> int:
    # A count read while the relay updates it may come out negative, or wrapped around as
    # an unsigned 64-bit number (18446744073709551615 for -1): no count is that large.
    return value if 0 <= value < 2**63 else 0


def _keys(known: Iterable[str], seen: Counter[str]) -> list[str]:
    """Known label values first (so every series exists from the start), then any other."""
    known = list(known)
    return known + sorted(k for k in seen if k not in known)


def _labels(**labels: str) -> str:
    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


# -- the HTTP endpoint ------------------------------------------------------------------------

async def start_metrics_server(metrics: Metrics, host: str, port: int) -> asyncio.Server:
    """Serve `GET /metrics` on host:port in the running loop; close() the server to stop.

    Raises OSError when the address cannot be bound (port in use, address not local).
    """
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _serve(metrics, reader, writer)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError):
            pass  # a scraper that went away or sent garbage: nothing to tell
        finally:
            writer.close()

    return await asyncio.start_server(serve, host, port, limit=MAX_REQUEST, reuse_address=True)


async def _serve(metrics: Metrics, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
    words = head.split(b"\r\n", 1)[0].decode("latin-1").split()
    headers = {}
    if len(words) != 3 or not words[2].startswith("HTTP/"):
        status, body = "400 Bad Request", "bad request\n"
    elif words[0] not in ("GET", "HEAD"):
        status, body = "405 Method Not Allowed", "use GET\n"
        headers["Allow"] = "GET, HEAD"
    elif words[1].split("?", 1)[0] != "/metrics":
        status, body = "404 Not Found", "the metrics are at /metrics\n"
    else:
        status, body = "200 OK", metrics.render()
        headers["Content-Type"] = CONTENT_TYPE
    data = body.encode()
    headers.setdefault("Content-Type", "text/plain; charset=utf-8")
    headers.update({"Content-Length": str(len(data)), "Connection": "close"})
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    writer.write("\r\n".join(lines).encode("latin-1") + (data if words[:1] != ["HEAD"] else b""))
    await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
