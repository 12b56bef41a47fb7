"""Path metrics: the bytes, retransmissions and RTT of MPTCP subflows per local address,
from the relay's per-address counters (Relay.path_totals), read only when Prometheus
scrapes. Nothing here runs per connection or per sample.

Labels stay bounded: a `local` label value is one of this host's own addresses (read from
/proc/net), at most MAX_LABELS of them; any other address (a foreign address a transparent
listener answers for, one past the limit) counts as local="other". Peer addresses, ports
and connection ids are never label values. An address keeps the label it was first given,
so every series only grows.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from mptcpproxy.relay._relay_py_paths import RTT_BOUNDS_US

log = logging.getLogger(__name__)

MAX_LABELS = 16  # own addresses given a label of their own; the rest is "other"
OTHER = "other"
RTT_BUCKETS = tuple(b / 1e6 for b in RTT_BOUNDS_US)  # seconds

# path_totals() rows: [sent, received, retrans, RTT counts per bucket (+Inf last), RTT sum]
_SENT, _RECEIVED, _RETRANS, _RTT = 0, 1, 2, 3


def own_addresses(fib_trie: str = "/proc/net/fib_trie",
                  if_inet6: str = "/proc/net/if_inet6") -> set[str]:
    """This host's (this network namespace's) IPv4 and IPv6 addresses."""
    out: set[str] = set()
    try:
        with open(fib_trie) as f:
            last = None
            for line in f:
                parts = line.split()
                if parts[:1] == ["|--"] and len(parts) == 2:
                    last = parts[1]
                elif "host" in parts and "LOCAL" in parts and last:
                    out.add(last)
    except OSError:
        pass
    try:
        with open(if_inet6) as f:
            for line in f:
                raw = line.split()[0] if line.strip() else ""
                if len(raw) == 32:
                    out.add(str(ipaddress.IPv6Address(int(raw, 16))))
    except (OSError, ValueError):
        pass
    return out


class PathLabels:
    """Maps local addresses to bounded label values, each address once and for good."""

    def __init__(self, addresses: Callable[[], set[str]] = own_addresses,
                 max_labels: int = MAX_LABELS) -> None:
        self.addresses = addresses
        self.max_labels = max_labels
        self.labels: dict[str | None, str] = {}
        self.used = 0
        self._own: set[str] = set()

    def of(self, addrs: Iterable[str | None]) -> dict[str | None, str]:
        """The label of each address. The host's addresses are read again (once) when one
        never labelled before is not among those last read: an address the host gained
        since is labelled as its own, and the reads stay as few as the addresses (the
        relay counts at most MAX_ADDRS per worker)."""
        addrs = list(addrs)
        if any(a is not None and a not in self.labels and a not in self._own for a in addrs):
            self._own = self.addresses()
        return {a: self.label(a) for a in addrs}

    def label(self, addr: str | None) -> str:
        found = self.labels.get(addr)
        if found is not None:
            return found
        if addr is not None and addr in self._own and self.used < self.max_labels:
            self.used += 1
            found = addr
        else:
            found = OTHER
        self.labels[addr] = found
        return found


class PathCollector:
    """The path metric families, from `totals` (Relay.path_totals) at each scrape."""

    def __init__(self, totals: Callable[[], tuple[dict, int]],
                 labels: PathLabels | None = None) -> None:
        self.totals = totals
        self.labels = labels or PathLabels()

    def collect(self) -> Iterator[Metric]:
        try:
            rows, reinjected = self.totals()
        except Exception:  # a scrape must not take the proxy down
            log.exception("cannot read the path counters")
            return
        by_label: dict[str, list] = {}
        names = self.labels.of(rows)
        for addr, row in rows.items():
            into = by_label.setdefault(names[addr], [0] * len(row))
            for k, v in enumerate(row):
                into[k] += v
        order = sorted(by_label)
        family = CounterMetricFamily(
            "mptcpproxy_path_bytes", "Bytes MPTCP subflows moved, by local address: sent "
            "(acknowledged by the peer) and received; counted at each sample.",
            labels=("direction", "local"))
        for name in order:
            family.add_metric(("sent", name), by_label[name][_SENT])
            family.add_metric(("received", name), by_label[name][_RECEIVED])
        yield family
        family = CounterMetricFamily(
            "mptcpproxy_path_retransmitted_bytes", "Bytes MPTCP subflows sent again "
            "(TCP retransmissions), by local address.", labels=("local",))
        for name in order:
            family.add_metric((name,), by_label[name][_RETRANS])
        yield family
        hist = HistogramMetricFamily(
            "mptcpproxy_path_rtt_seconds", "Smoothed RTT of established MPTCP subflows, "
            "by local address, one observation per subflow and sample.", labels=("local",))
        for name in order:
            counts = by_label[name][_RTT:_RTT + len(RTT_BUCKETS) + 1]
            cumulated, buckets = 0, []
            for bound, n in zip((*RTT_BUCKETS, float("inf")), counts, strict=True):
                cumulated += n
                buckets.append((floatToGoString(bound), cumulated))
            hist.add_metric([name], buckets, by_label[name][-1])
        yield hist
        yield CounterMetricFamily(
            "mptcpproxy_mptcp_reinjected_bytes", "Bytes MPTCP sent again on another subflow "
            "(mptcpi_bytes_retrans), all connections.", value=reinjected)
