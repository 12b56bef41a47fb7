"""--accept-proxy, --send-proxy and --source client at their edges: the metric's series, a
header the upstream does not take whole, the destination with -t, the claimed addresses
--source client refuses, the clients a handing-over listener sweeps from its backlog, and a
stop while a header is awaited. The main paths are in test_proxyhdr.py."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request

import pytest
import test_proxyhdr
from test_control_plane import closed_by_proxy as closed_without_reply
from test_control_plane import free_port
from test_metrics import samples, uvloop_primed, value  # noqa: F401  (uvloop_primed: a fixture)
from test_proxyhdr import (
    CLAIMED,
    CLAIMED_DST,
    TIMEOUT,
    config,
    connect,
    counts,
    no_connection_for,
    read_all,
    run_with_proxy,
    split_header,
    wait_for,
)

from mptcpproxy import proxyhdr
from mptcpproxy.config import Config, HostPort
from mptcpproxy.control import Proxy, _run_loop
from mptcpproxy.metrics import Metrics
from mptcpproxy.proxyproto import encode_v1, encode_v2, parse

keep_signal_dispositions = test_proxyhdr.keep_signal_dispositions
proxy_log = test_proxyhdr.proxy_log
upstream = test_proxyhdr.upstream


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


def test_a_connect_and_close_is_counted_empty_and_not_warned(upstream, proxy_log):
    """A load balancer's plain health check (HAProxy `check` without `check-send-proxy`)
    connects and closes, or resets, without a byte: counted under reason "empty", not
    logged as a failed header every few seconds. A client that stops inside its header is
    still "closed", and warned about."""
    def body(proxy: Proxy) -> None:
        errors = counts(proxy).proxy_header_errors
        with connect(proxy):
            pass  # connect and close
        wait_for(lambda: sum(errors.values()) == 1, "the first close")
        with connect(proxy) as client:  # connect and reset
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        wait_for(lambda: sum(errors.values()) == 2, "the reset")
        time.sleep(1.1)  # past the once-a-second limit of the warning line
        with connect(proxy) as client:
            client.sendall(b"PROXY TCP4 ")
        wait_for(lambda: sum(errors.values()) == 3, "the cut header")
        assert no_connection_for(upstream)

    proxy = run_with_proxy(config(upstream, accept_proxy=True), body)
    assert dict(counts(proxy).proxy_header_errors) == {"empty": 2, "closed": 1}
    warnings = [line for line in proxy_log.text.splitlines() if "closed without a reply" in line]
    assert len(warnings) == 1 and "(11 bytes of it arrived)" in warnings[0], proxy_log.text


def test_a_byte_then_a_reset_is_counted_closed_not_timeout(upstream):
    """One byte of a header, then a reset at once, before the proxy read anything: uvloop
    drops the reader of a socket whose first event carries the error, so the proxy only
    learns of it at --proxy-timeout; it must still say the client went away, not that it
    was slow (it said "timeout" for 3 of 3)."""
    port, metrics = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mptcpproxy", "-m", "client", "-p", str(port), "-b",
         "127.0.0.1", "-r", f"127.0.0.1:{upstream.getsockname()[1]}", "--disable-mptcp",
         "--accept-proxy", "--proxy-timeout", "1", "--workers", "1",
         "--metrics", f"127.0.0.1:{metrics}"],
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    url = f"http://127.0.0.1:{metrics}/metrics"

    def errors() -> dict[str, float]:
        got = samples(urllib.request.urlopen(url, timeout=TIMEOUT).read().decode())
        return {reason: value(got, "mptcpproxy_proxy_header_errors_total", reason=reason)
                for reason in ("closed", "timeout")}

    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                errors()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "no metrics"
                time.sleep(0.05)
        for _ in range(3):
            client = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            client.send(b"P")
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
        wait_for(lambda: sum(errors().values()) == 3, "the three clients' ends")
        assert errors() == {"closed": 3, "timeout": 0}
        assert no_connection_for(upstream)
    finally:
        proc.terminate()
        stderr = proc.communicate(timeout=TIMEOUT)[1]
    assert "no complete PROXY header within" not in stderr, stderr
    assert "Traceback" not in stderr, stderr
