"""--accept-proxy and --send-proxy on loopback, with the proxy in this process (plain TCP on
both legs): what reaches the upstream byte for byte, the log lines, the metric, the limits.
The chains with real peers (nginx, HAProxy, MPTCP between namespaces) are in
test_proxy_chain.py."""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import socket
import time
from collections.abc import Callable

import pytest
import test_control_plane
from test_control_plane import closed_by_proxy as closed_without_reply
from test_control_plane import free_port
from test_metrics import uvloop_primed  # noqa: F401  (a module fixture: libuv's global pipe)

from mptcpproxy.config import Config, HostPort
from mptcpproxy.control import Proxy, _run_loop
from mptcpproxy.logsetup import JsonFormatter
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

