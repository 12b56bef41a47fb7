"""`mptcp-proxy --connections HOST:PORT` against what a wrong address may hold: a server
that trickles its answer, one that redirects, an HTTP proxy in the environment, documents
that break the parser or the number formatting; and the per-address totals of the live
view when the proxy both sends and receives (a server proxy)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from test_live import TWO_PATHS, fake_proxy, path, stat
from test_metrics import uvloop_primed  # noqa: F401  (a module fixture)
from test_metrics_http import in_thread, with_server

from mptcpproxy import live
from mptcpproxy.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 30


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "mptcpproxy", *args], capture_output=True,
                          text=True, timeout=TIMEOUT, env=env, stdin=subprocess.DEVNULL)


@contextmanager
def one_shot(respond: Callable[[socket.socket, threading.Event], None]) -> Iterator[int]:
    """A server on 127.0.0.1 that answers one connection with `respond(conn, stop)`;
    yields its port."""
    stop = threading.Event()
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        srv.settimeout(TIMEOUT)

        def serve() -> None:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(TIMEOUT)
                try:
                    conn.recv(4096)
                    respond(conn, stop)
                except OSError:
                    pass

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            yield srv.getsockname()[1]
        finally:
            stop.set()
            thread.join(TIMEOUT)


def _answer(body: bytes) -> Callable[[socket.socket, threading.Event], None]:
    def respond(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
    return respond


def _one_line_error(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 1 and proc.stdout == "", proc
    assert proc.stderr.startswith("mptcp-proxy: error: "), proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_a_server_that_trickles_its_answer_is_given_up() -> None:
    def trickle(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        while not stop.wait(0.5):  # a byte every half second: each read gets one
            conn.sendall(b" ")

    with one_shot(trickle) as port:
        proc = _cli("--connections", f"127.0.0.1:{port}")
    _one_line_error(proc)
    assert "did not answer" in proc.stderr


def test_an_http_proxy_in_the_environment_is_not_asked() -> None:
    doc = live.document(fake_proxy([stat(3, TWO_PATHS)]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: a proxy that refuses
        proxy = f"http://127.0.0.1:{s.getsockname()[1]}"

        async def body(port: int) -> object:
            return await in_thread(lambda: _cli("--connections", f"127.0.0.1:{port}", env={
                "http_proxy": proxy, "HTTP_PROXY": proxy, "no_proxy": "", "NO_PROXY": ""}))

        proc = with_server("asyncio", Metrics(), body, connections=lambda: doc)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].split()[0] == "3"


def test_a_redirect_is_not_followed() -> None:
    doc = live.document(fake_proxy([stat(3, TWO_PATHS)]))

    async def body(port: int) -> object:
        def redirect(conn: socket.socket, stop: threading.Event) -> None:
            conn.sendall(f"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{port}/"
                         "connections\r\nContent-Length: 0\r\n\r\n".encode())

        def run() -> subprocess.CompletedProcess:
            with one_shot(redirect) as other:
                return _cli("--connections", f"127.0.0.1:{other}")
        return await in_thread(run)

    proc = with_server("asyncio", Metrics(), body, connections=lambda: doc)
    _one_line_error(proc)
    assert "answered 302" in proc.stderr


def test_documents_that_break_the_parser_or_the_numbers() -> None:
    for body in (b"[" * 100_000 + b"]" * 100_000,  # nested deeper than the parser recurses
                 b'{"connections": [{"id": 1, "paths": [{"id": 1, "rtt_us": 1'
                 + b"0" * 400 + b"}]}]}",  # too big for a float
                 b'{"connections": [{"id": 1, "age_s": 1e400, "paths": []}]}'):
        with one_shot(_answer(body)) as port:
            proc = _cli("--connections", f"127.0.0.1:{port}")
        _one_line_error(proc)


def test_the_totals_per_address_count_each_connection_as_its_end_line_does() -> None:
    """A server proxy: one connection sent 2 B on each of two paths (and received a
    little), another received 8 MB on the first address and 2 MB on a third, and sent
    nothing. Each connection's paths count as its own shares do (what it sent, or what it
    received when it received more): the first address carried about 80 %, not 50 %."""
    small = stat(1, (path(1, "10.0.1.2", "10.0.1.1", 2, received=100),
                     path(2, "10.0.2.2", "10.0.2.1", 2)))
    big = stat(2, (path(1, "10.0.1.2", "10.0.1.1", 0, received=8_000_000),
                   path(2, "10.0.3.2", "10.0.3.1", 0, received=2_000_000)))
    doc = live.document(fake_proxy([small, big]))
    shares = {x["address"]: x["share"] for x in doc["locals"]}
    assert shares == {"10.0.1.2": 80, "10.0.2.2": 0, "10.0.3.2": 20}, doc["locals"]
    # the fields beside the share are still the plain sums
    assert [x["bytes_received"] for x in doc["locals"]] == [8_000_100, 0, 2_000_000]
