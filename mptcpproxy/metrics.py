"""Prometheus metrics, rendered by prometheus-client from the proxy's own CollectorRegistry.

Per listener, the control plane counts each connection once: accepted, rejected, failed to
connect, ended (bytes, close reason, MPTCP or fallback, subflows, duration). Nothing here
runs per byte, and nothing reads the relay per connection: a collector reads its live
counters (connections open per listener, per-worker load) only when Prometheus scrapes.
prometheus-client's process and platform collectors add `process_open_fds`,
`process_max_fds`, memory, CPU and `python_info`.

Every per-connection series carries a `listener` label, the listener's name in the
configuration; the other label values are fixed lists (close reasons, connect failures,
directions) or the relay's worker index, so their number does not grow with traffic.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import platform
import socket
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

from mptcpproxy import __version__
from mptcpproxy.metrics_http import start_metrics_server
from mptcpproxy.pathmetrics import PathCollector
from mptcpproxy.proxyhdr import ERROR_REASONS
from mptcpproxy.relay._results import ABORTED, CLOSED, ERROR, RESET, TIMEOUT, Result, WorkerStats

__all__ = ["CONNECT_FAILURES", "ListenerMetrics", "Metrics", "connect_failure_reason",
           "start_metrics_server"]

log = logging.getLogger(__name__)

CLOSE_REASONS = (CLOSED, RESET, TIMEOUT, ERROR, ABORTED)  # how a relayed connection ends
CONNECT_FAILURES = ("refused", "timeout", "unreachable", "resolve", "other")
RELOAD_RESULTS = ("success", "failure")
SUBFLOW_BUCKETS = (1, 2, 3, 4, 5, 6, 8)  # subflows of one connection, the first included
DURATION_BUCKETS = (0.01, 0.1, 1, 10, 60, 600, 3600, 86400)  # seconds, up to a day

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


class _Histogram:
    """Counts per bucket of one series; cumulated only when scraped."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: a value on a bound is in it
        self.sum += value

    def buckets(self) -> list[tuple[str, int]]:
        # `le` as Prometheus 3 normalises it ("1.0", not "1"): the same series in 2 and 3
        cumulated, out = 0, []
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            cumulated += n
            out.append((floatToGoString(bound), cumulated))
        return out


class ListenerMetrics:
    """The counters of one listener. Call from the event loop thread only."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.accepted = 0  # by the control plane; the relay's own accepts are read live
        self.accept_errors = 0
        self.rejected = 0  # over --max-connections
        self.closed: Counter[str] = Counter()  # by Result.reason
        self.connect_failures: Counter[str] = Counter()  # by CONNECT_FAILURES
        self.client_to_upstream = 0
        self.upstream_to_client = 0
        self.mptcp_leg: Counter[str] = Counter()  # "mptcp" / "fallback"
        self.subflows = _Histogram(SUBFLOW_BUCKETS)  # MPTCP connections only
        self.duration = _Histogram(DURATION_BUCKETS)
        self.proxy_header_errors: Counter[str] = Counter()  # --accept-proxy, by reason

    def connection_accepted(self) -> None:
        self.accepted += 1

    def proxy_header_error(self, reason: str) -> None:
        """A connection closed because it brought no valid PROXY header (--accept-proxy);
        `reason`: one of proxyhdr.ERROR_REASONS."""
        self.proxy_header_errors[reason] += 1

    def accept_error(self) -> None:
        self.accept_errors += 1

    def connection_rejected(self) -> None:
        """An accepted connection closed at once because --max-connections was reached."""
        self.rejected += 1

    def connect_failed(self, reason: str) -> None:
        """An accepted connection dropped because its upstream could not be reached;
        `reason` is one of CONNECT_FAILURES (anything else counts as "other")."""
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
        self.duration.observe(result.duration)
        if mptcp_leg:
            self.mptcp_leg["mptcp" if result.is_mptcp else "fallback"] += 1
            if result.is_mptcp:
                self.subflows.observe(result.subflows)


class Metrics:
    """The metrics of one proxy process. Call from the event loop thread only (the
    endpoint renders there too)."""

    def __init__(self, active: Callable[[], Mapping[str, int]] | Callable[[], int] | None = None,
                 worker_stats: Callable[[], Sequence[WorkerStats]] | None = None, *,
                 relay_accepted: Callable[[], Mapping[str, int]] | None = None,
                 default_listener: str | None = None, engine: str | None = None,
                 path_totals: Callable[[], tuple[dict, int]] | None = None) -> None:
        # Read at scrape time only, from the control plane's own state, so they cannot
        # drift. `active`: listener name -> connections open (connecting upstream or
        # relayed); returning an int is the one-listener form, for the default listener.
        # `worker_stats` is Relay.stats. `relay_accepted`: listener name -> connections the
        # relay's workers accepted themselves (Relay.listen); without it, the one-listener
        # form counts every worker's accepts for the default listener. `engine`: "c" or
        # "py", else mptcpproxy.relay.ENGINE. `path_totals` is Relay.path_totals (the
        # path metrics, pathmetrics.py). A series whose source is None is left out.
        self.active = active
        self.worker_stats = worker_stats
        self.relay_accepted = relay_accepted
        self.default_listener = default_listener
        self.engine = engine
        self.start_time = time.time()
        self.reloads: Counter[str] = Counter()
        self._listeners: dict[str, ListenerMetrics] = {}
        if default_listener is not None:
            self.listener(default_listener)
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))
        if path_totals is not None:
            self.registry.register(PathCollector(path_totals))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def listener(self, name: str) -> ListenerMetrics:
        """The counters of listener `name`, made (every series at 0) on first use."""
        found = self._listeners.get(name)
        if found is None:
            found = self._listeners[name] = ListenerMetrics(name)
        return found

    def forget_listener(self, name: str) -> None:
        """Drop the series of a listener that is gone (removed by a reload and drained)."""
        self._listeners.pop(name, None)

    def config_reload(self, result: str) -> None:
        """A reload of the configuration file ended: "success" or "failure"."""
        if result not in RELOAD_RESULTS:
            raise ValueError(f"a reload result is one of {RELOAD_RESULTS}, not {result!r}")
        self.reloads[result] += 1

    def render(self) -> bytes:
        """The metrics in the Prometheus text exposition format."""
        return generate_latest(self.registry)

    # -- the one-listener form: the calls of ListenerMetrics, on the default listener ------

    @property
    def default(self) -> ListenerMetrics:
        """The default listener's counters ("" when not named: no label for Prometheus)."""
        return self.listener(self.default_listener or "")

    @property
    def closed(self) -> Counter[str]:
        return self.default.closed

    @property
    def connect_failures(self) -> Counter[str]:
        return self.default.connect_failures

    def connection_accepted(self) -> None:
        self.default.connection_accepted()

    def accept_error(self) -> None:
        self.default.accept_error()

    def connection_rejected(self) -> None:
        self.default.connection_rejected()

    def connect_failed(self, reason: str) -> None:
        self.default.connect_failed(reason)

    def relay_refused(self) -> None:
        self.default.relay_refused()

    def connection_closed(self, result: Result, mptcp_leg: bool) -> None:
        self.default.connection_closed(result, mptcp_leg)

    # -- what the collector reads --------------------------------------------------------

    def read_live(self) -> tuple[dict[str, int] | None, dict[str, int], list[WorkerStats]]:
        """(open connections per listener or None, the relay's own accepts per listener,
        the workers' stats); raises what the sources raise."""
        active = self.active() if self.active else None
        stats = list(self.worker_stats()) if self.worker_stats else []
        accepted = dict(self.relay_accepted()) if self.relay_accepted else {}
        if isinstance(active, int):  # the one-listener form
            name = self.default.name
            active = {name: active}
            if self.relay_accepted is None:
                accepted = {name: sum(_count(w.accepted) for w in stats)}
        elif active is not None:
            active = dict(active)
        for name in (*(active or ()), *accepted):
            self.listener(name)
        return active, accepted, stats

    def listeners(self) -> list[ListenerMetrics]:
        return list(self._listeners.values())


class _Collector:
    """Turns the counters into metric families, when the registry is collected."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        yield _gauge("mptcpproxy_start_time_seconds",
                     "Start time of the process since the Unix epoch.", [((), m.start_time)])
        yield _gauge("mptcpproxy_build_info", "The proxy's version, relay engine (c: "
                     "compiled, py: pure Python) and Python version; always 1.",
                     [((__version__, m.engine or _engine(), platform.python_version()), 1)],
                     ("version", "engine", "python"))
        yield _counter("mptcpproxy_config_reloads", "Reloads of the configuration file, by "
                       "result.", [((r,), m.reloads[r]) for r in RELOAD_RESULTS], ("result",))
        try:
            active, relay_accepted, stats = m.read_live()
        except Exception:  # a scrape must not take the proxy down; say why, per scrape
            log.exception("cannot read the live connection counts")
            active, relay_accepted, stats = None, {}, []
        yield from _per_listener(m.listeners(), active, relay_accepted)
        if stats:
            yield from _per_worker(stats)


def _per_listener(listeners: list[ListenerMetrics], active: dict[str, int] | None,
                  relay_accepted: dict[str, int]) -> Iterator[Metric]:
    by = ("listener",)
    yield _counter("mptcpproxy_connections_accepted", "Connections accepted from clients.",
                   [((x.name,), x.accepted + _count(relay_accepted.get(x.name, 0)))
                    for x in listeners], by)
    yield _counter("mptcpproxy_connections_closed", "Relayed connections that ended, by how "
                   "they ended.", _by_key(listeners, "closed", CLOSE_REASONS),
                   ("listener", "reason"))
    yield _counter("mptcpproxy_connections_rejected", "Connections closed at once because "
                   "--max-connections was reached.", [((x.name,), x.rejected)
                                                      for x in listeners], by)
    yield _counter("mptcpproxy_accept_errors", "accept() calls on the listening socket that "
                   "failed.", [((x.name,), x.accept_errors) for x in listeners], by)
    yield _counter("mptcpproxy_upstream_connect_failures", "Connections dropped because the "
                   "upstream could not be reached, by reason.",
                   _by_key(listeners, "connect_failures", CONNECT_FAILURES),
                   ("listener", "reason"))
    yield _counter("mptcpproxy_bytes", "Bytes relayed, by direction; added when a connection "
                   "ends.", [((x.name, d), getattr(x, d)) for x in listeners
                             for d in ("client_to_upstream", "upstream_to_client")],
                   ("listener", "direction"))
    yield _counter("mptcpproxy_proxy_header_errors", "Connections closed without a valid "
                   "PROXY header (--accept-proxy), by reason.",
                   _by_key(listeners, "proxy_header_errors", ERROR_REASONS),
                   ("listener", "reason"))
    yield _counter("mptcpproxy_mptcp_leg_connections", "Ended connections whose MPTCP leg "
                   "really used MPTCP, or fell back to TCP.",
                   _by_key(listeners, "mptcp_leg", ("mptcp", "fallback")),
                   ("listener", "result"))
    for name, help_, attr in (
        ("mptcpproxy_mptcp_subflows", "Most subflows each ended MPTCP connection had, the "
         "first included.", "subflows"),
        ("mptcpproxy_connection_duration_seconds", "How long each relayed connection lasted, "
         "from its hand-over to the relay.", "duration"),
    ):
        family = HistogramMetricFamily(name, help_, labels=by)
        for x in listeners:
            histogram = getattr(x, attr)
            family.add_metric([x.name], histogram.buckets(), histogram.sum)
        yield family
    if active is not None:
        yield _gauge("mptcpproxy_connections_active", "Connections open now: connecting "
                     "upstream or relayed.", [((x.name,), _count(active.get(x.name, 0)))
                                              for x in listeners], by)


def _per_worker(stats: list[WorkerStats]) -> Iterator[Metric]:
    for name, make, field, help_ in (
        ("mptcpproxy_worker_active_pairs", _gauge, "active", "Pairs a relay worker holds "
         "now."),
        ("mptcpproxy_worker_pairs", _counter, "pairs", "Pairs handed to a relay worker."),
        ("mptcpproxy_worker_bytes", _counter, "bytes", "Bytes a relay worker moved, both "
         "directions, live."),
    ):
        yield make(name, help_, [((str(i),), _count(getattr(s, field)))
                                 for i, s in enumerate(stats)], ("worker",))


Samples = Iterable[tuple[Sequence[str], float]]


def _counter(name: str, help_: str, samples: Samples, labels: Sequence[str] = ()) -> Metric:
    family = CounterMetricFamily(name, help_, labels=labels)  # writes name_total
    for values, value in samples:
        family.add_metric(values, value)
    return family


def _gauge(name: str, help_: str, samples: Samples, labels: Sequence[str] = ()) -> Metric:
    family = GaugeMetricFamily(name, help_, labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family


def _by_key(listeners: list[ListenerMetrics], attr: str,
            known: Sequence[str]) -> list[tuple[tuple[str, str], int]]:
    """Per listener, the known label values first (every series exists from the start),
    then any other seen."""
    out = []
    for x in listeners:
        seen: Counter[str] = getattr(x, attr)
        keys = [*known, *sorted(k for k in seen if k not in known)]
        out.extend(((x.name, k), seen[k]) for k in keys)
    return out


def _count(value: int) -> int:
    # A count read while the relay updates it may come out negative, or wrapped around as
    # an unsigned 64-bit number (18446744073709551615 for -1): no count is that large.
    return value if 0 <= value < 2**63 else 0


def _engine() -> str:
    from mptcpproxy.relay import ENGINE  # the engine loaded by now, when the proxy runs

    return ENGINE
