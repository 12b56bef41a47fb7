"""Metrics: the counters per listener, the exposition rendered by prometheus-client (checked
with its own parser), the collectors read at scrape time, the docs' example queries, and the
HTTP endpoint scraped with urllib on 127.0.0.1."""

from __future__ import annotations

import asyncio
import errno
import platform
import re
import socket
from pathlib import Path

import pytest
import uvloop
from prometheus_client import parser

from mptcpproxy import __version__
from mptcpproxy.metrics import Metrics, connect_failure_reason
from mptcpproxy.proxyhdr import ERROR_REASONS  # the reasons of --accept-proxy's errors
from mptcpproxy.relay import ENGINE
from mptcpproxy.relay._results import Result, WorkerStats

TIMEOUT = 10.0
DOCS = Path(__file__).resolve().parent.parent / "docs" / "operating.md"


def result(reason: str = "closed", up: int = 0, down: int = 0, is_mptcp: bool = False,
           subflows: int = 0, duration: float = 0.5) -> Result:
    return Result(1, up, down, duration, reason, 0, is_mptcp, subflows)


def samples(text: str | bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value}, via prometheus-client's own parser."""
    if isinstance(text, bytes):
        text = text.decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in parser.text_string_to_metric_families(text) for s in family.samples}


def value(got: dict, name: str, **labels: str) -> float:
    """The sample `name{labels}` summed over every listener (the label is left out of
    `labels`), or over the one given as listener=...; KeyError when there is none."""
    def wanted(lbls: tuple[tuple[str, str], ...]) -> bool:
        have = dict(lbls)
        if "listener" not in labels:
            have.pop("listener", None)
        return have == labels

    found = [v for (n, lbls), v in got.items() if n == name and wanted(lbls)]
    if not found:
        raise KeyError(f"{name}{labels}")
    return sum(found)


def families(text: str | bytes) -> dict[str, str]:
    if isinstance(text, bytes):
        text = text.decode()
    return {f.name: f.type for f in parser.text_string_to_metric_families(text)}


def busy_metrics() -> Metrics:
    """Two listeners, traffic on one of them: as the control plane records it."""
    rtt = [0, 0, 3, 1] + [0] * 9 + [0.011]
    m = Metrics(active=lambda: {"5555": 4, "6666": 0},
                worker_stats=lambda: [WorkerStats(2, 10, 1000), WorkerStats(0, 3, 7)],
                path_totals=lambda: ({"127.0.0.1": [600, 20, 5, *rtt],
                                      "192.0.2.77": [400, 10, 0, *rtt]}, 64))
    edge = m.listener("5555")
    m.listener("6666")
    for _ in range(7):
        edge.connection_accepted()
    edge.connection_rejected()
    edge.accept_error()
    edge.connect_failed("refused")
    edge.connect_failed("no such reason")
    edge.connection_closed(result("closed", 100, 2000, True, 3, 0.05), mptcp_leg=True)
    edge.connection_closed(result("reset", 5, 6, False, 0, 2.0), mptcp_leg=True)
    edge.connection_closed(result("timeout", 1, 1, True, 1, 120.0), mptcp_leg=True)
    m.config_reload("success")
    return m


def test_counters_by_listener() -> None:
    got = samples(busy_metrics().render())

    def edge(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted({**labels, "listener": "5555"}.items())))]

    assert edge("mptcpproxy_connections_accepted_total") == 7
    assert edge("mptcpproxy_connections_rejected_total") == 1
    assert edge("mptcpproxy_accept_errors_total") == 1
    assert edge("mptcpproxy_connections_active") == 4  # read from the control plane
    assert [edge("mptcpproxy_connections_closed_total", reason=r)
            for r in ("closed", "reset", "timeout", "error", "aborted")] == [1, 1, 1, 0, 0]
    failures = "mptcpproxy_upstream_connect_failures_total"
    assert edge(failures, reason="refused") == 1
    assert edge(failures, reason="other") == 1
    assert edge(failures, reason="resolve") == 0
    assert edge("mptcpproxy_bytes_total", direction="client_to_upstream") == 106
    assert edge("mptcpproxy_bytes_total", direction="upstream_to_client") == 2007
    leg = "mptcpproxy_mptcp_leg_connections_total"
    assert edge(leg, result="mptcp") == 2 and edge(leg, result="fallback") == 1
    subflows = "mptcpproxy_mptcp_subflows"
    assert edge(f"{subflows}_bucket", le="1.0") == 1
    assert edge(f"{subflows}_bucket", le="2.0") == 1
    assert edge(f"{subflows}_bucket", le="3.0") == 2
    assert edge(f"{subflows}_bucket", le="+Inf") == 2
    assert edge(f"{subflows}_count") == 2 and edge(f"{subflows}_sum") == 4
    duration = "mptcpproxy_connection_duration_seconds"
    assert edge(f"{duration}_bucket", le="0.1") == 1
    assert edge(f"{duration}_bucket", le="10.0") == 2
    assert edge(f"{duration}_bucket", le="+Inf") == 3
    assert edge(f"{duration}_count") == 3
    assert edge(f"{duration}_sum") == pytest.approx(122.05)
    # the other listener: every series there, at 0
    quiet = {(n, lbls): v for (n, lbls), v in got.items() if ("listener", "6666") in lbls}
    assert quiet[("mptcpproxy_connections_accepted_total", (("listener", "6666"),))] == 0
    assert len(quiet) == len([k for k in got if ("listener", "5555") in k[1]])
    assert not any(quiet.values())
    # per worker, not per listener
    assert got[("mptcpproxy_worker_active_pairs", (("worker", "0"),))] == 2
    assert got[("mptcpproxy_worker_pairs_total", (("worker", "1"),))] == 3
    assert got[("mptcpproxy_worker_bytes_total", (("worker", "0"),))] == 1000
    reloads = "mptcpproxy_config_reloads_total"
    assert got[(reloads, (("result", "success"),))] == 1
    assert got[(reloads, (("result", "failure"),))] == 0


def test_types_help_and_names() -> None:
    text = busy_metrics().render()
    kinds = families(text)
    assert kinds["mptcpproxy_connections_accepted"] == "counter"  # the parser drops _total
    assert kinds["mptcpproxy_connections_active"] == "gauge"
    assert kinds["mptcpproxy_mptcp_subflows"] == "histogram"
    assert kinds["mptcpproxy_connection_duration_seconds"] == "histogram"
    assert kinds["mptcpproxy_bytes"] == "counter"
    assert kinds["mptcpproxy_build_info"] == "gauge"
    for name in kinds:
        assert name.startswith(("mptcpproxy_", "process_", "python_")), name
    assert not any(name.endswith("_created") for name in kinds)  # no per-series timestamps
    helps = [line for line in text.decode().splitlines() if line.startswith("# HELP ")]
    assert len(helps) == len(kinds) and all(len(h.split(" ", 3)[3]) > 10 for h in helps)


def test_label_values_are_listener_names_and_fixed_enums() -> None:
    # Cardinality: however many clients, upstreams and errnos, the label values come from
    # the configuration (listener), the relay's workers, or a fixed list.
    m = Metrics(active=lambda: {"5555": 0})
    edge = m.listener("5555")
    for i in range(50):
        edge.connect_failed(f"errno {i}")
        edge.connection_closed(Result(i, i, i, i / 10, "closed", i, True, i % 12, ("10.0.0.1", i)),
                               mptcp_leg=True)
    allowed = {"listener": {"5555"}, "reason": None, "direction": None, "result": None,
               "le": None, "worker": None, "version": {__version__}, "engine": {"c", "py"},
               "python": {platform.python_version()}}
    values: dict[str, set[str]] = {}
    for (name, lbls), _ in samples(m.render()).items():
        if name.startswith("mptcpproxy_"):
            for k, v in lbls:
                values.setdefault(k, set()).add(v)
    assert set(values) <= set(allowed)
    for k, v in values.items():
        assert allowed[k] is None or v <= allowed[k], (k, v)
    assert values["reason"] == {"closed", "reset", "timeout", "error", "aborted", "refused",
                                "unreachable", "resolve", "other", *ERROR_REASONS}


def test_histogram_buckets_are_written_as_prometheus_3_reads_them() -> None:
    # Prometheus 3 normalises `le` to the float form ("1" is stored as "1.0"); written so,
    # `le="1.0"` selects the same series in Prometheus 2 and 3.
    m = Metrics()
    m.listener("5555").connection_closed(result("closed", 1, 1, True, 1), mptcp_leg=True)
    text = m.render().decode()
    assert re.search(r'^mptcpproxy_mptcp_subflows_bucket\{[^}]*\ble="1\.0"[^}]*\} 1\.0$', text,
                     re.M)
    les = {dict(s.labels)["le"] for f in parser.text_string_to_metric_families(text)
           for s in f.samples if s.name.endswith("_bucket")}
    assert {"1.0", "2.0", "8.0", "0.01", "0.1", "60.0", "86400.0", "+Inf"} <= les
    assert all("." in le or "e" in le or le == "+Inf" for le in les)
    assert not re.search(r'le="\d+"', text)


def test_process_platform_and_build_info() -> None:
    got = samples(Metrics().render())
    assert got[("process_open_fds", ())] > 2
    assert got[("process_max_fds", ())] > got[("process_open_fds", ())]
    assert got[("process_resident_memory_bytes", ())] > 0
    assert ("process_cpu_seconds_total", ()) in got
    assert any(name == "python_info" for name, _ in got)
    build = [lbls for name, lbls in got if name == "mptcpproxy_build_info"]
    assert build == [(("engine", ENGINE), ("python", platform.python_version()),
                      ("version", __version__))]
    assert got[("mptcpproxy_build_info", build[0])] == 1
    assert got[("mptcpproxy_start_time_seconds", ())] > 1.6e9


def test_config_reloads() -> None:
    m = Metrics()
    got = samples(m.render())
    reloads = "mptcpproxy_config_reloads_total"
    assert got[(reloads, (("result", "success"),))] == 0  # both there from the start
    assert got[(reloads, (("result", "failure"),))] == 0
    m.config_reload("failure")
    m.config_reload("failure")
    m.config_reload("success")
    got = samples(m.render())
    assert got[(reloads, (("result", "success"),))] == 1
    assert got[(reloads, (("result", "failure"),))] == 2
    with pytest.raises(ValueError):
        m.config_reload("maybe")


def test_new_listener_has_every_series_at_zero() -> None:
    m = Metrics()
    assert not any(("listener", "7777") in lbls for _, lbls in samples(m.render()))
    assert m.listener("7777") is m.listener("7777")
    got = samples(m.render())
    at = (("listener", "7777"),)
    assert got[("mptcpproxy_connections_accepted_total", at)] == 0
    assert got[("mptcpproxy_connections_closed_total", (("listener", "7777"),
                                                        ("reason", "error")))] == 0
    assert got[("mptcpproxy_upstream_connect_failures_total", (("listener", "7777"),
                                                                ("reason", "timeout")))] == 0
    assert got[("mptcpproxy_mptcp_subflows_count", at)] == 0
    assert not any(name.startswith("mptcpproxy_worker_") for name, _ in got)
    assert not any(name == "mptcpproxy_connections_active" for name, _ in got)  # no source


def test_a_forgotten_listener_leaves_the_exposition() -> None:
    m = Metrics(active=lambda: {"5555": 0})
    m.listener("6666").connection_accepted()
    m.forget_listener("6666")
    m.forget_listener("7777")  # never there: nothing to do
    listeners = {v for _, lbls in samples(m.render()) for k, v in lbls if k == "listener"}
    assert listeners == {"5555"}


def test_live_counters_are_read_at_scrape_time_only() -> None:
    reads = []

    def active() -> dict[str, int]:
        reads.append("active")
        return {"5555": len(reads)}

    def stats() -> list[WorkerStats]:
        reads.append("stats")
        return [WorkerStats(1, 1, 1)]

    m = Metrics(active=active, worker_stats=stats, relay_accepted=lambda: {"5555": 40})
    edge = m.listener("5555")
    for _ in range(100):
        edge.connection_accepted()
        edge.connection_closed(result("closed", 1, 1, True, 2), mptcp_leg=True)
    assert reads == []  # nothing per connection
    got = samples(m.render())
    assert reads == ["active", "stats"]
    # accepted: by the control plane (100) and by the relay's workers themselves (40)
    assert value(got, "mptcpproxy_connections_accepted_total", listener="5555") == 140
    assert value(got, "mptcpproxy_connections_active", listener="5555") == 1


def test_old_one_listener_form_counts_under_the_default_listener() -> None:
    # Metrics(active=<int>, ...) and the per-connection calls on Metrics itself: the
    # control plane of one listener, labelled with default_listener ("" when not named,
    # which Prometheus reads as no label at all).
    for name in ("5555", None):
        m = Metrics(active=lambda: 3, worker_stats=lambda: [WorkerStats(3, 9, 9, 5, 0)],
                    default_listener=name)
        m.connection_accepted()
        m.connection_rejected()
        m.accept_error()
        m.connect_failed("timeout")
        m.relay_refused()
        m.connection_closed(result("closed", 7, 8, True, 2), mptcp_leg=True)
        assert m.closed["error"] == 1 and m.connect_failures["timeout"] == 1
        got = samples(m.render())
        at = {"listener": name or ""}
        # accepted: one by the control plane, five by the relay's workers (Relay.listen)
        assert value(got, "mptcpproxy_connections_accepted_total", **at) == 6
        assert value(got, "mptcpproxy_connections_rejected_total", **at) == 1
        assert value(got, "mptcpproxy_accept_errors_total", **at) == 1
        assert value(got, "mptcpproxy_connections_active", **at) == 3
        assert value(got, "mptcpproxy_connections_closed_total", reason="error", **at) == 1
        assert value(got, "mptcpproxy_bytes_total", direction="client_to_upstream", **at) == 7
        assert value(got, "mptcpproxy_mptcp_subflows_bucket", le="2.0", **at) == 1


def test_plain_tcp_leg_is_not_counted_as_fallback() -> None:
    m = Metrics()
    m.listener("5555").connection_closed(result("closed", 1, 1), mptcp_leg=False)
    got = samples(m.render())
    assert value(got, "mptcpproxy_mptcp_leg_connections_total", result="fallback") == 0
    assert value(got, "mptcpproxy_connections_closed_total", reason="closed") == 1


def test_live_counters_failure_does_not_break_the_scrape(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> list[WorkerStats]:
        raise RuntimeError("relay closed")

    m = Metrics(active=lambda: {"5555": 1}, worker_stats=broken)
    m.listener("5555").connection_accepted()
    got = samples(m.render())
    assert value(got, "mptcpproxy_connections_accepted_total") == 1
    assert ("process_open_fds", ()) in got
    assert "cannot read the live connection counts" in caplog.text


@pytest.mark.parametrize("active", [-1, 2**64 - 1, 2**63], ids=["negative", "wrapped", "2^63"])
def test_active_gauges_never_show_a_negative_or_wrapped_count(active: int) -> None:
    # A count read while the relay's counters are being updated (issue 11, item 6): the
    # gauge says 0 rather than -1 or 18446744073709551615.
    stats = [WorkerStats(active, 5, 10)]
    for live in (lambda: active, lambda: {"5555": active}):
        got = samples(Metrics(active=live, worker_stats=lambda: stats).render())
        assert value(got, "mptcpproxy_connections_active") == 0
        assert got[("mptcpproxy_worker_active_pairs", (("worker", "0"),))] == 0
        assert got[("mptcpproxy_worker_pairs_total", (("worker", "0"),))] == 5


def doc_queries() -> list[str]:
    """The PromQL in docs/operating.md: its ```promql blocks."""
    blocks = re.findall(r"^```promql\n(.*?)^```", DOCS.read_text(), re.S | re.M)
    lines = [line for block in blocks for line in block.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert lines, "no query found in docs/operating.md"
    return lines


def test_docs_example_queries_name_real_series() -> None:
    # Every selector in the docs' example queries names a series a busy proxy exposes,
    # with label values it really writes (le="1.0", not le="1").
    m = busy_metrics()
    got = samples(m.render())
    names = {name for name, _ in got}
    checked = 0
    for line in doc_queries():
        for name, matchers in re.findall(r"\b((?:mptcpproxy|process|python)_\w+)(\{[^}]*\})?",
                                         line):
            assert name in names, f"docs/operating.md: {line!r}: no series {name}"
            for label, val in re.findall(r'(\w+)="([^"]*)"', matchers):
                assert any(n == name and (label, val) in lbls for n, lbls in got), \
                    f"docs/operating.md: {line!r}: no {name} with {label}={val!r}"
            checked += 1
    assert checked >= 5
    table = re.findall(r"^\| `((?:mptcpproxy|process)_\w+)` \|", DOCS.read_text(), re.M)
    kinds = families(m.render())
    for name in table:  # the table names families (counters without _total)
        assert name in kinds or name.removesuffix("_total") in kinds, name
    assert {n for n in kinds if n.startswith("mptcpproxy_")} <= {
        n.removesuffix("_total") for n in table}


@pytest.mark.parametrize("exc, reason", [
    (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "resolve"),
    (TimeoutError(), "timeout"),
    (asyncio.TimeoutError(), "timeout"),
    (OSError(errno.ETIMEDOUT, "timed out"), "timeout"),
    (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), "refused"),
    (OSError(errno.ENETUNREACH, "unreachable"), "unreachable"),
    (OSError(errno.EHOSTUNREACH, "no route"), "unreachable"),
    (OSError(errno.EACCES, "denied"), "other"),
    (RuntimeError("?"), "other"),
])
def test_connect_failure_reason(exc: BaseException, reason: str) -> None:
    assert connect_failure_reason(exc) == reason


# -- shared with test_metrics_http and test_control_plane ----------------------------------------

@pytest.fixture(scope="module", autouse=True)
def uvloop_primed() -> None:
    """uvloop's first loop opens a process-wide pipe that stays: open it before the fd-leak
    check takes its snapshot."""
    uvloop.new_event_loop().close()
