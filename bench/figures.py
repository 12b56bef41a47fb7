"""The figures of a bench results file (JSON lines): the metrics, the peers' labels, and
each figure's median over the runs."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

PEER_LABELS = {
    "direct": "no proxy",
    "tcp": "mptcpproxy TCP→TCP",
    "tcp-quiet": "mptcpproxy -q",
    "tcp-splice": "mptcpproxy --splice",
    "tcp-busy": "mptcpproxy --busy-poll 50",
    "pair": "mptcpproxy pair TCP→MPTCP→TCP",
    "py": "pure-Python twin TCP→TCP",
    "haproxy": "HAProxy",
    "haproxy-splice": "HAProxy splice-auto",
    "haproxy-splice-forced": "HAProxy splice forced",
    "haproxy-busy": "HAProxy busy-polling",
    "socat": "socat",
    "pair-no-paths": "mptcpproxy pair --no-path-stats",
    "haproxy-pair": "HAProxy pair under mptcpize TCP→MPTCP→TCP",
    "bare": "bare C relay TCP→TCP (the floor)",
    "bare-pair": "bare C relay pair TCP→MPTCP→TCP (the floor)",
    "uring": "io_uring prototype TCP→TCP",
    "uring-pair": "io_uring prototype pair TCP→MPTCP→TCP",
    "uring-ms": "io_uring prototype, multishot accept",
    "tcp-1path": "one TCP path",
    "mptcp-direct": "MPTCP sockets (mptcpize)",
}
# Each target is judged twice: default set-ups (mptcpproxy TCP->TCP against the better
# of HAProxy with and without splice-auto, as the issue sets it up), and the better of
# each side's tuned set-ups (mptcpproxy --splice / --busy-poll, HAProxy busy-polling).
# "haproxy-splice-forced" is shown beside them, not judged against.
DEFAULTS = (("tcp",), ("haproxy", "haproxy-splice"))
TUNED = (("tcp", "tcp-splice", "tcp-busy"), ("haproxy", "haproxy-splice", "haproxy-busy"))


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    fmt: str
    higher_is_better: bool


METRICS = [
    Metric("tput1_gbps", "throughput, 1 stream", "Gbit/s", "{:.2f}", True),
    Metric("tput8_gbps", "throughput, 8 streams", "Gbit/s", "{:.2f}", True),
    Metric("cpu_s_per_gb", "proxy CPU per GB relayed, 1 stream", "s", "{:.3f}", False),
    Metric("cpu8_s_per_gb", "proxy CPU per GB relayed, 8 streams", "s", "{:.3f}", False),
    Metric("rt_per_s", "ping-pong round trips/s", "1/s", "{:,.0f}", True),
    Metric("rt_p50_us", "ping-pong latency p50", "µs", "{:.1f}", False),
    Metric("rt_p99_us", "ping-pong latency p99", "µs", "{:.1f}", False),
    Metric("rt_cpu_us", "proxy CPU per round trip", "µs", "{:.1f}", False),
    Metric("rt1cpu_per_s", "ping-pong, all on one CPU: round trips/s", "1/s", "{:,.0f}", True),
    Metric("conn_per_s", "new connections/s (8 in flight)", "1/s", "{:,.0f}", True),
    Metric("conn16_per_s", "new connections/s (16 in flight)", "1/s", "{:,.0f}", True),
    Metric("conn64_per_s", "new connections/s (64 in flight)", "1/s", "{:,.0f}", True),
    Metric("conn_p50_us", "connection set-up p50 (8 in flight)", "µs", "{:.0f}", False),
    Metric("conn_p99_us", "connection set-up p99 (8 in flight)", "µs", "{:.0f}", False),
    Metric("conn64_p99_us", "connection set-up p99 (64 in flight)", "µs", "{:.0f}", False),
    Metric("conn_cpu_us", "proxy CPU per connection (8 in flight)", "µs", "{:.0f}", False),
    Metric("conn64_cpu_us", "proxy CPU per connection (64 in flight)", "µs", "{:.0f}",
           False),
    Metric("burst_served", "1000 simultaneous connects: served", "", "{:.0f}", True),
    Metric("burst_p99_ms", "1000 simultaneous connects: set-up p99", "ms", "{:.1f}", False),
    Metric("idle_kib_1k", "memory per idle connection, 1000 held", "KiB", "{:.2f}", False),
    Metric("idle_kib_10k", "memory per idle connection, 10,000 held", "KiB", "{:.2f}", False),
    Metric("held_1k", "1000 held: still echoing at the end", "", "{:,.0f}", True),
    Metric("held_10k", "10,000 held: still echoing at the end", "", "{:,.0f}", True),
    Metric("shaped_mbps", "two 100 Mbit/s paths", "Mbit/s", "{:.1f}", True),
    Metric("cut_intact", "path cut mid-transfer: all bytes, same sha256", "", "{:.0f}", True),
]
BY_KEY = {m.key: m for m in METRICS}


def fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "–"
    m = BY_KEY.get(metric)
    return m.fmt.format(value) if m else f"{value:g}"


class Results:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.meta: dict = {}
        self.end: dict = {}
        self.errors: list[dict] = []
        self.samples: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            kind = rec.get("type")
            if kind == "meta":
                self.meta = rec
            elif kind == "end":
                self.end = rec
            elif kind == "error":
                self.errors.append(rec)
            elif kind == "sample":
                self.samples[rec["metric"], rec["peer"]].append(rec)

    def median(self, metric: str, peer: str) -> float | None:
        values = [s["value"] for s in self.samples.get((metric, peer), ())]
        return statistics.median(values) if values else None

    def count(self, metric: str, peer: str) -> int:
        return len(self.samples.get((metric, peer), ()))

    def medians(self) -> dict[tuple[str, str], float]:
        return {key: self.median(*key) for key in self.samples}

    def peers(self) -> list[str]:
        seen = {peer for _, peer in self.samples}
        order = self.meta.get("peers") or list(PEER_LABELS)
        return [p for p in order if p in seen]

    def best(self, metric: str, peers: tuple[str, ...]) -> tuple[float | None, str | None]:
        """The best of these peers' figures for this metric, and whose it is."""
        best, which = None, None
        higher = BY_KEY[metric].higher_is_better
        for peer in peers:
            v = self.median(metric, peer)
            if v is not None and (best is None or (v > best if higher else v < best)):
                best, which = v, peer
        return best, which


