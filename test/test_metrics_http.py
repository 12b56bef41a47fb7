"""The `--metrics` HTTP endpoint (metrics_http.py), scraped with urllib on 127.0.0.1, in an
asyncio and a uvloop event loop."""

from __future__ import annotations

import asyncio
import errno
import socket
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable

import pytest
import uvloop
from prometheus_client import CONTENT_TYPE_LATEST
from test_metrics import result, samples, uvloop_primed, value  # noqa: F401  (a module fixture)

from mptcpproxy.metrics import Metrics, start_metrics_server

TIMEOUT = 10.0
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def with_server(loop_name: str, metrics: Metrics,
                body: Callable[[int], Awaitable[object]],
                ready: Callable[[], bool] | None = None, **server_kw: object) -> object:
    """Run `body(port)` in a loop of that kind while the metrics endpoint listens
    (`server_kw`: more arguments of start_metrics_server)."""
    async def main() -> object:
        server = await start_metrics_server(metrics, "127.0.0.1", 0, ready=ready, **server_kw)
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
    edge = metrics.listener("5555")

    async def body(port: int) -> object:
        first = await in_thread(fetch, port)
        edge.connection_accepted()
        edge.connection_closed(result("closed", 10, 20, True, 2), mptcp_leg=True)
        return first, await in_thread(fetch, port)

    (status0, _, text0), (status, headers, text) = with_server(loop_name, metrics, body)
    assert status0 == status == 200
    assert headers["Content-Type"] == CONTENT_TYPE_LATEST
    assert headers["Content-Type"].startswith("text/plain; version=")
    assert value(samples(text0), "mptcpproxy_connections_accepted_total", listener="5555") == 0
    got = samples(text)
    assert value(got, "mptcpproxy_connections_accepted_total", listener="5555") == 1
    assert value(got, "mptcpproxy_bytes_total", direction="upstream_to_client") == 20
    assert value(got, "mptcpproxy_mptcp_subflows_bucket", le="2.0") == 1
    assert 'le="2.0"' in text.decode()


@pytest.mark.parametrize("loop_name", LOOPS)
def test_other_paths_and_methods(loop_name: str) -> None:
    async def body(port: int) -> object:
        return [await in_thread(fetch, port, *args) for args in
                [("/",), ("/metrics", "POST"), ("/metrics?x=1", "HEAD")]]

    (s404, _, b404), (s405, h405, _), (shead, hhead, bhead) = with_server(
        loop_name, Metrics(), body)
    assert s404 == 404 and b"/metrics" in b404 and b"/ready" in b404
    assert s405 == 405 and h405["Allow"] == "GET, HEAD"
    assert shead == 200 and bhead == b"" and int(hhead["Content-Length"]) > 100


@pytest.mark.parametrize("loop_name", LOOPS)
def test_ready_follows_the_callable_and_live_stays(loop_name: str) -> None:
    """A load balancer's health check: /ready is 200 while serving, 503 from the stop
    signal on (the callable turned false), while /live stays 200 and /metrics works."""
    serving = [True]

    async def body(port: int) -> object:
        before = [await in_thread(fetch, port, path) for path in ("/ready", "/live")]
        serving[0] = False
        after = [await in_thread(fetch, port, *args) for args in
                 [("/ready",), ("/ready?x=1", "HEAD"), ("/live",), ("/metrics",)]]
        return before, after

    before, after = with_server(loop_name, Metrics(), body, ready=lambda: serving[0])
    (r_status, r_headers, r_body), (l_status, _, l_body) = before
    assert (r_status, r_body, l_status, l_body) == (200, b"ready\n", 200, b"live\n")
    assert r_headers["Content-Type"] == "text/plain; charset=utf-8"
    (r_status, _, r_body), (h_status, h_headers, h_body), (l_status, _, l_body), \
        (m_status, _, _) = after
    assert (r_status, r_body) == (503, b"stopping\n")
    assert (h_status, h_body, h_headers["Content-Length"]) == (503, b"", "9")
    assert (l_status, l_body, m_status) == (200, b"live\n", 200)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_ready_without_a_callable(loop_name: str) -> None:
    async def body(port: int) -> object:
        return await in_thread(fetch, port, "/ready")

    status, _, text = with_server(loop_name, Metrics(), body)
    assert (status, text) == (200, b"ready\n")


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


@pytest.mark.parametrize("loop_name", LOOPS)
def test_lf_only_requests_are_answered(loop_name: str) -> None:
    """A health checker that ends its lines with LF alone (`printf 'GET /ready
    HTTP/1.0\\n\\n' | nc`) gets its answer, as nginx and HAProxy give it."""
    async def ask(port: int, request: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request)
            return await reader.read()
        finally:
            writer.close()

    async def body(port: int) -> object:
        return [await ask(port, request) for request in (
            b"GET /ready HTTP/1.0\n\n", b"GET /live HTTP/1.1\nHost: x\n\n",
            b"GET /ready HTTP/1.0\r\nHost: x\n\r\n")]

    ready, live, mixed = with_server(loop_name, Metrics(), body)
    assert ready.startswith(b"HTTP/1.1 200 OK\r\n") and ready.endswith(b"\r\n\r\nready\n")
    assert live.startswith(b"HTTP/1.1 200 OK\r\n") and live.endswith(b"\r\n\r\nlive\n")
    assert mixed.startswith(b"HTTP/1.1 200 OK\r\n") and mixed.endswith(b"ready\n")


@pytest.mark.parametrize("loop_name", LOOPS)
def test_many_short_header_lines_are_refused_past_the_limit(loop_name: str) -> None:
    async def body(port: int) -> object:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /metrics HTTP/1.1\n" + b"X: y\n" * 3000 + b"\n")
            return await reader.read()
        finally:
            writer.close()

    assert with_server(loop_name, Metrics(), body) == b""
