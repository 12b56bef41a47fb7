"""--accept-proxy and --send-proxy on loopback, with the proxy in this process (plain TCP on
both legs): what reaches the upstream byte for byte, the log lines, the metric, the limits.
The chains with real peers (nginx, HAProxy, MPTCP between namespaces) are in
test_proxy_chain.py."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import test_control_plane
from test_control_plane import closed_by_proxy as closed_without_reply
from test_control_plane import free_port
from test_metrics import samples, uvloop_primed, value  # noqa: F401  (uvloop_primed: a fixture)

from mptcpproxy import proxyhdr
from mptcpproxy.config import Config, HostPort
from mptcpproxy.control import Proxy, _run_loop
from mptcpproxy.logsetup import JsonFormatter
from mptcpproxy.metrics import Metrics
from mptcpproxy.proxyproto import Header, encode_v1, encode_v2, parse

TIMEOUT = 10.0
CLAIMED, CLAIMED_DST = ("203.0.113.7", 40000), ("198.51.100.1", 443)


# the proxy's signal handlers undone after each test; its INFO lines captured
keep_signal_dispositions = test_control_plane.keep_signal_dispositions
proxy_log = test_control_plane.proxy_log


@pytest.fixture
def upstream():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        sock.settimeout(TIMEOUT)
        yield sock


def config(upstream: socket.socket, **options) -> Config:
    return Config(mode="client", port=free_port(), bind="127.0.0.1",
                  remote=HostPort("127.0.0.1", upstream.getsockname()[1]),
                  disable_mptcp=True, workers=1, **options)


def run_with_proxy(cfg: Config, body: Callable[[Proxy], object]) -> Proxy:
    """Start a proxy for `cfg`, run the blocking `body(proxy)` in a thread, then drain."""
    proxy = Proxy(cfg)

    async def scenario() -> None:
        await proxy.start()
        try:
            await asyncio.wait_for(asyncio.to_thread(body, proxy), 60)
        finally:
            await proxy.drain()

    _run_loop(scenario())
    return proxy


def connect(proxy: Proxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.config.port), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_all(sock: socket.socket) -> bytes:
    sock.settimeout(TIMEOUT)
    out = bytearray()
    while data := sock.recv(1 << 16):
        out += data
    return bytes(out)


def no_connection_for(upstream: socket.socket) -> bool:
    upstream.settimeout(0.2)
    try:
        conn, _ = upstream.accept()
    except TimeoutError:
        return True
    conn.close()
    return False


def split_header(data: bytes) -> tuple[Header, bytes]:
    header = parse(data)
    assert isinstance(header, Header), data[:64]
    return header, data[header.length:]


PAYLOAD = random.Random(12).randbytes(1 << 20)


# -- header and data ------------------------------------------------------------------------

@pytest.mark.parametrize("send_proxy", [None, "v1", "v2"], ids=["none", "send-v1", "send-v2"])
@pytest.mark.parametrize("version", [1, 2], ids=["accept-v1", "accept-v2"])
@pytest.mark.parametrize("splice", [False, True], ids=["copy", "splice"])
def test_header_and_data_in_one_segment(upstream, proxy_log, version, send_proxy, splice):
    """The client's header and the first MiB of data in one send(): the header is consumed
    to its last byte and no further; what follows reaches the upstream intact, behind the
    proxy's own header naming the same client (--send-proxy) or alone."""
    encode = encode_v1 if version == 1 else encode_v2
    got: dict[str, object] = {}

    def body(proxy: Proxy) -> None:
        assert not proxy.listeners[proxy.config.port].fast
        with connect(proxy) as client:
            client.sendall(encode(CLAIMED, CLAIMED_DST) + PAYLOAD)
            client.shutdown(socket.SHUT_WR)
            conn, _ = upstream.accept()
            with conn:
                got["data"] = read_all(conn)
                conn.sendall(b"reply")
            assert read_all(client) == b"reply"
            got["via"] = client.getsockname()

    run_with_proxy(config(upstream, accept_proxy=True, send_proxy=send_proxy, splice=splice),
                   body)
    data = got["data"]
    if send_proxy is None:
        assert hashlib.sha256(data).digest() == hashlib.sha256(PAYLOAD).digest()
    else:
        header, rest = split_header(data)
        assert header.version == int(send_proxy[1])
        assert (header.source, header.destination) == (CLAIMED, CLAIMED_DST)
        assert hashlib.sha256(rest).digest() == hashlib.sha256(PAYLOAD).digest()
    via = f"127.0.0.1:{got['via'][1]}"
    assert f"client 203.0.113.7:40000 via {via} upstream" in proxy_log.text, proxy_log.text
    end = [r for r in proxy_log.records if getattr(r, "event", None) == "conn_end"]
    assert (end[0].client, end[0].via) == ("203.0.113.7:40000", via)
    assert f'"via": "{via}"' in JsonFormatter().format(end[0])


def test_header_split_over_many_segments(upstream):
    """A v1 line in five pieces, then data: read across wake-ups, consumed exactly."""
    line = encode_v1(("2001:db8::7", 1234), ("2001:db8::1", 80))

    def body(proxy: Proxy) -> None:
        with connect(proxy) as client:
            for i in range(0, len(line), 12):
                client.sendall(line[i:i + 12])
                time.sleep(0.05)
            client.sendall(b"hello")
            client.shutdown(socket.SHUT_WR)
            conn, _ = upstream.accept()
            with conn:
                body.data = read_all(conn)

    run_with_proxy(config(upstream, accept_proxy=True, send_proxy="v2"), body)
    header, rest = split_header(body.data)
    assert header.source == ("2001:db8::7", 1234) and rest == b"hello"


def test_local_header_keeps_the_real_endpoints(upstream, proxy_log):
    """A v2 LOCAL header (a health check): the client is the peer itself, and the header
    sent on names it and the listener's address."""
    def body(proxy: Proxy) -> None:
        with connect(proxy) as client:
            client.sendall(encode_v2(None, None, command="LOCAL") + b"ping")
            client.shutdown(socket.SHUT_WR)
            conn, _ = upstream.accept()
            with conn:
                body.data = read_all(conn)
            body.client = client.getsockname()
            read_all(client)

    proxy = run_with_proxy(config(upstream, accept_proxy=True, send_proxy="v1"), body)
    port = body.client[1]
    assert body.data == (f"PROXY TCP4 127.0.0.1 127.0.0.1 {port} {proxy.config.port}\r\n"
                         "ping").encode()
    assert f"client 127.0.0.1:{port} upstream" in proxy_log.text, proxy_log.text
    assert " via " not in proxy_log.text


def test_send_proxy_alone_names_the_peer_and_the_listener(upstream):
    def body(proxy: Proxy) -> None:
        with connect(proxy) as client:
            client.sendall(b"data")
            client.shutdown(socket.SHUT_WR)
            conn, _ = upstream.accept()
            with conn:
                body.data = read_all(conn)
            body.client = client.getsockname()

    proxy = run_with_proxy(config(upstream, send_proxy="v2"), body)
    header, rest = split_header(body.data)
    assert header.source == body.client
    assert header.destination == ("127.0.0.1", proxy.config.port)
    assert rest == b"data"


# -- rejections -----------------------------------------------------------------------------

def test_plain_traffic_is_rejected_at_the_first_byte(upstream, proxy_log):
    """One byte that cannot start a header: closed without a reply at once, well before
    the deadline (30 s here); counted by reason; no upstream connection."""
    def body(proxy: Proxy) -> None:
        with connect(proxy) as client:
            client.sendall(b"G")
            assert closed_without_reply(client)
        assert no_connection_for(upstream)

    proxy = run_with_proxy(config(upstream, accept_proxy=True, proxy_timeout=30), body)
    assert counts(proxy).proxy_header_errors == {"signature": 1}
    assert "closed without a reply: not a PROXY header: first byte b'G'" in proxy_log.text


def test_slow_sender_is_rejected_at_the_deadline(upstream, proxy_log):
    """One byte every 250 ms: one deadline for the whole header, not one per read, so the
    proxy closes the connection long before the 28-byte header is complete."""
    header = encode_v2(CLAIMED, CLAIMED_DST)

    def body(proxy: Proxy) -> None:
        with connect(proxy) as client:
            sent = 0
            try:
                for byte in header:
                    client.sendall(bytes((byte,)))
                    sent += 1
                    time.sleep(0.25)
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert closed_without_reply(client)
        body.sent = sent
        assert no_connection_for(upstream)

    proxy = run_with_proxy(config(upstream, accept_proxy=True, proxy_timeout=1.0), body)
    assert counts(proxy).proxy_header_errors == {"timeout": 1}
    match = re.search(r"no complete PROXY header within 1 s \((\d+) bytes of it arrived",
                      proxy_log.text)
    assert match, proxy_log.text
    assert 0 < int(match[1]) < len(header)
    assert body.sent < len(header)


def test_client_closing_before_the_header_is_complete(upstream, proxy_log):
    def body(proxy: Proxy) -> None:
        with connect(proxy) as client:
            client.sendall(b"PROXY TCP4 ")
        wait_for(lambda: counts(proxy).proxy_header_errors, "the error to be counted")

    proxy = run_with_proxy(config(upstream, accept_proxy=True), body)
    assert counts(proxy).proxy_header_errors == {"closed": 1}
    assert "the client closed the connection before a complete PROXY header" in proxy_log.text


def test_errors_are_logged_once_a_second_and_all_counted(upstream, proxy_log):
    n = 20

    def body(proxy: Proxy) -> None:
        start = time.monotonic()
        for _ in range(n):
            with connect(proxy) as client:
                client.sendall(b"\x16\x03\x01")  # a TLS client hello
                assert closed_without_reply(client)
        body.elapsed = time.monotonic() - start

    proxy = run_with_proxy(config(upstream, accept_proxy=True), body)
    assert counts(proxy).proxy_header_errors["signature"] == n
    lines = proxy_log.text.count("closed without a reply")
    assert 1 <= lines <= int(body.elapsed) + 1, proxy_log.text


def test_pending_headers_count_against_max_connections(upstream, proxy_log):
    """A client still owing its header holds a place: a second one is closed at once;
    once the first has sent its header it is relayed."""
    def body(proxy: Proxy) -> None:
        with connect(proxy) as first:
            wait_for(lambda: proxy.listeners[proxy.config.port].connecting, "the first client")
            with connect(proxy) as second:
                assert closed_without_reply(second)
            first.sendall(encode_v2(CLAIMED, CLAIMED_DST) + b"late")
            first.shutdown(socket.SHUT_WR)
            conn, _ = upstream.accept()
            with conn:
                body.data = read_all(conn)

    proxy = run_with_proxy(config(upstream, accept_proxy=True, max_connections=1), body)
    assert body.data == b"late"
    assert counts(proxy).rejected == 1


def counts(proxy: Proxy):
    """The only listener's metrics."""
    (listener,) = proxy.all_listeners
    return listener.metrics


def wait_for(pred, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# -- pieces ---------------------------------------------------------------------------------

def test_the_metric_has_every_reason_from_the_start():
    metrics = Metrics()
    metrics.listener("4444").proxy_header_error("crc")
    got = samples(metrics.render())
    assert value(got, "mptcpproxy_proxy_header_errors_total", listener="4444", reason="crc") == 1
    for reason in proxyhdr.ERROR_REASONS:
        if reason != "crc":
            assert value(got, "mptcpproxy_proxy_header_errors_total", reason=reason) == 0


class _ShortSend:
    def __init__(self) -> None:
        self.closed = False

    def send(self, data: bytes) -> int:
        return len(data) // 2

    def close(self) -> None:
        self.closed = True


def test_a_header_not_taken_whole_fails_the_connection(caplog):
    """A short send of the header is not retried behind the relay's back: the connection
    fails, both sockets closed, counted and logged."""
    class Stub(proxyhdr.ProxyHeaders):
        config = Config(mode="server", port=4444, remote=HostPort("10.0.0.2", 80),
                        send_proxy="v2")
        transparent = None
        metrics = Metrics()

    class Attempt:
        conn_id, addr, target, origin = 7, ("192.0.2.9", 5000), HostPort("10.0.0.2", 80), None
        upstream, client = _ShortSend(), _ShortSend()

    Attempt.client.getsockname = lambda: ("10.0.0.1", 4444)
    caplog.set_level(logging.INFO, logger="mptcpproxy")
    assert Stub()._send_header(Attempt) is False
    assert Attempt.upstream.closed and Attempt.client.closed
    assert Stub.metrics.connect_failures["other"] == 1
    assert ("conn 7 from 192.0.2.9:5000: cannot send the PROXY header to 10.0.0.2:80: only "
            "14 of its 28 bytes were taken") in caplog.text


def test_a_stop_closes_the_clients_still_owing_their_header(upstream):
    """SIGTERM while a client has sent no header yet: the proxy stops (exit 0, no
    traceback) and that client is closed, not left waiting."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mptcpproxy", "-m", "client", "-p", str(port), "-b",
         "127.0.0.1", "-r", f"127.0.0.1:{upstream.getsockname()[1]}", "--disable-mptcp",
         "--accept-proxy", "--proxy-timeout", "60"],
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                client = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
                break
            except ConnectionRefusedError:
                assert proc.poll() is None and time.monotonic() < deadline, "no listener"
                time.sleep(0.05)
        with client:
            time.sleep(0.2)  # accepted, its header awaited
            proc.send_signal(signal.SIGTERM)
            assert closed_without_reply(client)
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
        stderr = proc.stderr.read()
        proc.stderr.close()
    assert "Traceback" not in stderr
    assert no_connection_for(upstream)


class _Transparent:
    fallback = HostPort("10.0.0.9", 4444)


class _Sock:
    def getsockname(self):
        return ("::ffff:10.0.0.1", 5555, 0, 0)


@pytest.mark.parametrize(("target", "dst"), [
    (HostPort("192.0.2.80", 80), ("192.0.2.80", 80)),  # intercepted: the original destination
    (HostPort("10.0.0.9", 4444), ("10.0.0.1", 5555)),  # straight to the listener: its address
])
def test_send_proxy_destination_in_transparent_mode(target, dst):
    class Stub(proxyhdr.ProxyHeaders):
        config = Config(mode="client", port=5555, remote=None, transparent="tproxy",
                        send_proxy="v2")
        transparent = _Transparent()

    class Attempt:
        addr, origin, client = ("::ffff:192.0.2.9", 5000, 0, 0), None, _Sock()

    Attempt.target = target
    header = parse(Stub()._header_bytes(Attempt))
    assert (header.source, header.destination) == (("192.0.2.9", 5000), dst)


@pytest.mark.privileged  # IP_TRANSPARENT needs CAP_NET_ADMIN
@pytest.mark.parametrize(("claim", "why"), [
    (("127.0.0.5", 1000), "127.0.0.5, a loopback address"),
    (("224.0.0.1", 1000), "224.0.0.1, a multicast address"),
    (None, "127.0.0.1, a loopback address"),  # no header: the peer itself
])
def test_source_client_refuses_claimed_addresses(upstream, proxy_log, claim, why):
    def body(proxy: Proxy) -> None:
        with connect(proxy) as client:
            client.sendall((encode_v2(claim, CLAIMED_DST) if claim else b"") + b"x")
            assert closed_without_reply(client)
        assert no_connection_for(upstream)

    cfg = config(upstream, accept_proxy=claim is not None, source="client")
    proxy = run_with_proxy(dataclasses.replace(cfg, mode="server"), body)
    assert f"refused: --source client cannot connect from {why}" in proxy_log.text
    assert counts(proxy).connect_failures["other"] == 1


def test_clients_swept_from_the_backlog_send_their_header_too(upstream):
    """A listener that hands over takes the clients still queued on its socket (sweep):
    with --accept-proxy their header is read as for any other, not relayed as data."""
    proxy = Proxy(config(upstream, accept_proxy=True, send_proxy="v2"))
    got = {}

    def body(loop: asyncio.AbstractEventLoop) -> None:
        listener = proxy.listeners[proxy.config.port]
        loop.call_soon_threadsafe(loop.remove_reader, listener.listener.fileno())
        time.sleep(0.1)  # the reader is gone: the next client waits in the backlog
        with connect(proxy) as client:
            client.sendall(encode_v1(CLAIMED, CLAIMED_DST) + b"queued")
            client.shutdown(socket.SHUT_WR)
            loop.call_soon_threadsafe(listener.sweep)
            conn, _ = upstream.accept()
            with conn:
                got["data"] = read_all(conn)

    async def scenario() -> None:
        await proxy.start()
        try:
            await asyncio.wait_for(asyncio.to_thread(body, asyncio.get_running_loop()), 60)
        finally:
            await proxy.drain()

    _run_loop(scenario())
    header, rest = split_header(got["data"])
    assert header.source == CLAIMED and rest == b"queued"
