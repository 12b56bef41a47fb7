"""Metrics: the counters, the text exposition (checked with prometheus-client's parser) and
the HTTP endpoint scraped with urllib on 127.0.0.1."""

from __future__ import annotations

import asyncio
import errno
import socket
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable

import pytest
import uvloop
from prometheus_client import parser  # tests only: an independent reader of the format

from mptcpproxy.metrics import Metrics, connect_failure_reason, start_metrics_server
from mptcpproxy.relay._results import Result, WorkerStats

TIMEOUT = 10.0


def result(reason: str = "closed", up: int = 0, down: int = 0, is_mptcp: bool = False,
           subflows: int = 0) -> Result:
    return Result(1, up, down, 0.5, reason, 0, is_mptcp, subflows)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value}, via prometheus-client's own parser."""
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


def families(text: str) -> dict[str, str]:
    return {f.name: f.type for f in parser.text_string_to_metric_families(text)}


def busy_metrics() -> Metrics:
    m = Metrics(active=lambda: 4,
                worker_stats=lambda: [WorkerStats(2, 10, 1000), WorkerStats(0, 3, 7)])
    for _ in range(7):
        m.connection_accepted()
    m.connection_rejected()
    m.accept_error()
    m.connect_failed("refused")
    m.connect_failed("no such reason")
    m.connection_closed(result("closed", 100, 2000, True, 3), mptcp_leg=True)
    m.connection_closed(result("reset", 5, 6, False, 0), mptcp_leg=True)
    m.connection_closed(result("timeout", 1, 1, True, 1), mptcp_leg=True)
    return m


def test_counters_and_exposition() -> None:
    text = busy_metrics().render()
    got = samples(text)
    assert got[("mptcpproxy_connections_accepted_total", ())] == 7
    assert got[("mptcpproxy_connections_rejected_total", ())] == 1
    assert got[("mptcpproxy_accept_errors_total", ())] == 1
    assert got[("mptcpproxy_connections_active", ())] == 4  # read from the control plane
    closed = "mptcpproxy_connections_closed_total"
    assert [got[(closed, (("reason", r),))] for r in ("closed", "reset", "timeout", "error",
                                                     "aborted")] == [1, 1, 1, 0, 0]
    failures = "mptcpproxy_upstream_connect_failures_total"
    assert got[(failures, (("reason", "refused"),))] == 1
    assert got[(failures, (("reason", "other"),))] == 1
    assert got[(failures, (("reason", "resolve"),))] == 0
    assert got[("mptcpproxy_bytes_total", (("direction", "client_to_upstream"),))] == 106
    assert got[("mptcpproxy_bytes_total", (("direction", "upstream_to_client"),))] == 2007
    leg = "mptcpproxy_mptcp_leg_connections_total"
    assert got[(leg, (("result", "mptcp"),))] == 2 and got[(leg, (("result", "fallback"),))] == 1
    assert got[("mptcpproxy_mptcp_subflows_bucket", (("le", "1"),))] == 1
    assert got[("mptcpproxy_mptcp_subflows_bucket", (("le", "2"),))] == 1
    assert got[("mptcpproxy_mptcp_subflows_bucket", (("le", "3"),))] == 2
    assert got[("mptcpproxy_mptcp_subflows_bucket", (("le", "+Inf"),))] == 2
    assert got[("mptcpproxy_mptcp_subflows_count", ())] == 2
    assert got[("mptcpproxy_mptcp_subflows_sum", ())] == 4
    assert got[("mptcpproxy_worker_active_pairs", (("worker", "0"),))] == 2
    assert got[("mptcpproxy_worker_pairs_total", (("worker", "1"),))] == 3
    assert got[("mptcpproxy_worker_bytes_total", (("worker", "0"),))] == 1000


def test_types_help_and_names() -> None:
    text = busy_metrics().render()
    kinds = families(text)
    assert kinds["mptcpproxy_connections_accepted"] == "counter"  # the parser drops _total
    assert kinds["mptcpproxy_connections_active"] == "gauge"
    assert kinds["mptcpproxy_mptcp_subflows"] == "histogram"
    assert kinds["mptcpproxy_bytes"] == "counter"
    for name in kinds:
        assert name.startswith("mptcpproxy_")
    helps = [line for line in text.splitlines() if line.startswith("# HELP ")]
    assert len(helps) == len(kinds) and all(len(h.split(" ", 3)[3]) > 10 for h in helps)


def test_fresh_metrics_have_every_series_at_zero() -> None:
    got = samples(Metrics().render())
    assert got[("mptcpproxy_connections_closed_total", (("reason", "error"),))] == 0
    assert got[("mptcpproxy_upstream_connect_failures_total", (("reason", "timeout"),))] == 0
    assert got[("mptcpproxy_mptcp_subflows_count", ())] == 0
    assert not any(name.startswith("mptcpproxy_worker_") for name, _ in got)
    assert ("mptcpproxy_connections_active", ()) not in got  # no source given


def test_plain_tcp_leg_is_not_counted_as_fallback() -> None:
    m = Metrics()
    m.connection_closed(result("closed", 1, 1), mptcp_leg=False)  # --disable-mptcp
    got = samples(m.render())
    assert got[("mptcpproxy_mptcp_leg_connections_total", (("result", "fallback"),))] == 0


def test_worker_stats_failure_does_not_break_the_scrape(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> list[WorkerStats]:
        raise RuntimeError("relay closed")

    got = samples(Metrics(active=lambda: 1, worker_stats=broken).render())
    assert ("mptcpproxy_connections_accepted_total", ()) in got
    assert "cannot read the live connection counts" in caplog.text


@pytest.mark.parametrize("active", [-1, 2**64 - 1, 2**63], ids=["negative", "wrapped", "2^63"])
def test_active_gauges_never_show_a_negative_or_wrapped_count(active: int) -> None:
    # A count read while the relay's counters are being updated (issue 11, item 6): the
    # gauge says 0 rather than -1 or 18446744073709551615.
    got = samples(Metrics(active=lambda: active,
                          worker_stats=lambda: [WorkerStats(active, 5, 10)]).render())
    assert got[("mptcpproxy_connections_active", ())] == 0
    assert got[("mptcpproxy_worker_active_pairs", (("worker", "0"),))] == 0
    assert got[("mptcpproxy_worker_pairs_total", (("worker", "0"),))] == 5


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


# -- the HTTP endpoint --------------------------------------------------------------------------

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="module", autouse=True)
def uvloop_primed() -> None:
    """uvloop's first loop opens a process-wide pipe that stays: open it before the fd-leak
    check takes its snapshot."""
    uvloop.new_event_loop().close()


def with_server(loop_name: str, metrics: Metrics,
                body: Callable[[int], Awaitable[object]]) -> object:
    """Run `body(port)` in a loop of that kind while the metrics endpoint listens."""
    async def main() -> object:
        server = await start_metrics_server(metrics, "127.0.0.1", 0)
        try:
            port = server.sockets[0].getsockname()[1]
            return await asyncio.wait_for(body(port), TIMEOUT)
        finally:
            server.close()
            await server.wait_closed()

    loop = LOOPS[loop_name]()
    try:
        return loop.run_until_complete(main())
    finally:
        # as asyncio.run() does: cancel what is left (a silent scraper's handler) first
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        if left:
            loop.run_until_complete(asyncio.wait(left, timeout=TIMEOUT))
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def fetch(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, dict, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read()


async def in_thread(fn: Callable[..., object], *args: object) -> object:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_scrape_after_updates(loop_name: str) -> None:
    metrics = Metrics()

    async def body(port: int) -> object:
        first = await in_thread(fetch, port)
        metrics.connection_accepted()
        metrics.connection_closed(result("closed", 10, 20, True, 2), mptcp_leg=True)
        return first, await in_thread(fetch, port)

    (status0, _, text0), (status, headers, text) = with_server(loop_name, metrics, body)
    assert status0 == status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert samples(text0.decode())[("mptcpproxy_connections_accepted_total", ())] == 0
    got = samples(text.decode())
    assert got[("mptcpproxy_connections_accepted_total", ())] == 1
    assert got[("mptcpproxy_bytes_total", (("direction", "upstream_to_client"),))] == 20
    assert got[("mptcpproxy_mptcp_subflows_bucket", (("le", "2"),))] == 1


@pytest.mark.parametrize("loop_name", LOOPS)
def test_other_paths_and_methods(loop_name: str) -> None:
    async def body(port: int) -> object:
        return [await in_thread(fetch, port, *args) for args in
                [("/",), ("/metrics", "POST"), ("/metrics?x=1", "HEAD")]]

    (s404, _, b404), (s405, h405, _), (shead, hhead, bhead) = with_server(
        loop_name, Metrics(), body)
    assert s404 == 404 and b"/metrics" in b404
    assert s405 == 405 and h405["Allow"] == "GET, HEAD"
    assert shead == 200 and bhead == b"" and int(hhead["Content-Length"]) > 100


@pytest.mark.parametrize("loop_name", LOOPS)
def test_silent_and_garbage_clients_do_not_block_scrapes(loop_name: str) -> None:
    async def body(port: int) -> object:
        # one client connects and says nothing, another sends an oversized header
        silent = await asyncio.open_connection("127.0.0.1", port)
        greedy_r, greedy_w = await asyncio.open_connection("127.0.0.1", port)
        greedy_w.write(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
        try:
            closed = await greedy_r.read()  # the server hangs up without an answer
            return closed, await in_thread(fetch, port)
        finally:
            for w in (silent[1], greedy_w):
                w.close()

    closed, (status, _, _) = with_server(loop_name, Metrics(), body)
    assert closed == b""
    assert status == 200


def test_port_in_use_raises_oserror() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def main() -> None:
            await start_metrics_server(Metrics(), "127.0.0.1", port)

        with pytest.raises(OSError) as info:
            asyncio.run(main())
    assert info.value.errno == errno.EADDRINUSE
