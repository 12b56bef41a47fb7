"""The proxies as processes on loopback inside a private namespace:
TCP -> client proxy -> MPTCP -> server proxy -> TCP service."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Sequence

import pytest

pytestmark = pytest.mark.privileged

PEERS = os.path.join(os.path.dirname(__file__), "peers.py")
SERVICE, SERVER, CLIENT = 7000, 4444, 5555


def start_proxy(host, *args: str, port: int):
    proc = host.start([sys.executable, "-m", "mptcpproxy", *args], name=f"proxy-{port}")
    host.wait_listening(port, proc=proc)
    return proc


def peer(host, *args: str, timeout: float = 120) -> dict:
    out = host.run([sys.executable, PEERS, *args], timeout=timeout).stdout
    return json.loads(out.strip().splitlines()[-1])


def chain(testbed, service: str = "echo", *extra: str, remote: str | None = None,
          server_args: Sequence[str] = (), client_args: Sequence[str] = ()):
    """One host running the service, a server proxy and a client proxy in front of it;
    `server_args` and `client_args` are added to each proxy's command line."""
    host = testbed.host("lo")
    svc = host.start([sys.executable, PEERS, service, str(SERVICE), *extra], name="service")
    host.wait_listening(SERVICE, proc=svc)
    server = start_proxy(host, "-m", "server", "-p", str(SERVER), "-r",
                         f"127.0.0.1:{SERVICE}", *server_args, port=SERVER)
    client = start_proxy(host, "-m", "client", "-p", str(CLIENT), "-r",
                         remote or f"127.0.0.1:{SERVER}", *client_args, port=CLIENT)
    return host, server, client


def assert_closed_without_data(host) -> None:
    """A client of the client proxy sees its connection closed (or reset), no byte."""
    probe = (
        "import socket\n"
        f"s = socket.create_connection(('127.0.0.1', {CLIENT}), timeout=10)\n"
        "try:\n    print(repr(s.recv(10)))\n"
        "except ConnectionResetError:\n    print('reset')\n"
    )
    out = host.run([sys.executable, "-c", probe], timeout=30).stdout.strip()
    assert out in ("b''", "reset")


def stop_cleanly(proc) -> str:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.describe()
    return proc.stderr


@pytest.mark.parametrize("relay_args", [(), ("--splice",)], ids=["copy", "splice"])
def test_100_concurrent_connections_intact_over_mptcp(testbed, relay_args):
    host, server, client = chain(testbed, server_args=relay_args, client_args=relay_args)
    monitor = host.monitor()
    report = peer(host, "clients", "127.0.0.1", str(CLIENT), "100", "7")
    assert report["failed"] == []
    assert report["connections"] == 100
    # The kernel says the middle leg ran MPTCP: the path manager saw the connections
    # (both ends live in this namespace, so each one is counted twice) ...
    counts = monitor.wait_for({"CREATED": 200, "ESTABLISHED": 200})
    assert counts["CREATED"] == 200
    # ... and each proxy read TCP_IS_MPTCP on its MPTCP socket.
    for proc in (client, server):
        log = stop_cleanly(proc)
        assert log.count("mptcp=yes") == 100, log[-2000:]
        assert "mptcp=no" not in log


@pytest.mark.parametrize("relay_args", [(), ("--splice",)], ids=["copy", "splice"])
def test_client_half_closes_first_and_gets_the_whole_reply(testbed, relay_args):
    host, server, client = chain(testbed, "reply", str(8 << 20), server_args=relay_args,
                                 client_args=relay_args)
    assert peer(host, "ask", "127.0.0.1", str(CLIENT), str(8 << 20)) == {
        "bytes": 8 << 20, "intact": True,
    }
    assert "closed: client" in stop_cleanly(client)


@pytest.mark.parametrize("remote", [f"[::1]:{SERVER}", f"localhost:{SERVER}"],
                         ids=["ipv6", "hostname"])
def test_ipv6_and_hostname_remotes(testbed, remote):
    host, server, client = chain(testbed, remote=remote)
    report = peer(host, "clients", "::1", str(CLIENT), "10", "11")
    assert report["failed"] == []
    log = stop_cleanly(client)
    assert log.count("mptcp=yes") == 10, log[-2000:]


def test_disable_mptcp_chain_uses_plain_tcp(testbed):
    host = testbed.host("lo")
    svc = host.start([sys.executable, PEERS, "echo", str(SERVICE)], name="service")
    host.wait_listening(SERVICE, proc=svc)
    server = start_proxy(host, "-m", "server", "-p", str(SERVER), "-r",
                         f"127.0.0.1:{SERVICE}", "--disable-mptcp", port=SERVER)
    client = start_proxy(host, "-m", "client", "-p", str(CLIENT), "-r",
                         f"127.0.0.1:{SERVER}", "--disable-mptcp", port=CLIENT)
    monitor = host.monitor()
    report = peer(host, "clients", "127.0.0.1", str(CLIENT), "20", "13")
    assert report["failed"] == []
    assert monitor.counts()["CREATED"] == 0
    for proc in (client, server):
        assert stop_cleanly(proc).count("mptcp=off") == 20


def test_upstream_refused_closes_client_and_keeps_serving(testbed):
    host = testbed.host("lo")
    client = start_proxy(host, "-m", "client", "-p", str(CLIENT), "-r", "127.0.0.1:1",
                         port=CLIENT)
    for _ in range(2):  # still serving after the first failure
        assert_closed_without_data(host)
    log = stop_cleanly(client)
    assert log.count("upstream 127.0.0.1:1 failed: connection refused") == 2, log


def test_sigterm_stops_with_exit_0(testbed):
    host = testbed.host("lo")
    proc = start_proxy(host, "-m", "server", "-p", str(SERVER), "-r", "127.0.0.1:1",
                       port=SERVER)
    log = stop_cleanly(proc)
    assert "stopped" in log
    assert not host.listening(SERVER)


def test_every_address_of_a_name_is_tried(testbed):
    # The server proxy listens on IPv4 only; "localhost" also resolves to ::1, which is
    # refused: the client proxy goes on to the next address instead of failing.
    host = testbed.host("lo")
    svc = host.start([sys.executable, PEERS, "echo", str(SERVICE)], name="service")
    host.wait_listening(SERVICE, proc=svc)
    start_proxy(host, "-m", "server", "-b", "127.0.0.1", "-p", str(SERVER), "-r",
                f"127.0.0.1:{SERVICE}", port=SERVER)
    client = start_proxy(host, "-m", "client", "-p", str(CLIENT), "-r", f"localhost:{SERVER}",
                         port=CLIENT)
    assert peer(host, "clients", "127.0.0.1", str(CLIENT), "4", "17")["failed"] == []
    log = stop_cleanly(client)
    assert log.count("upstream 127.0.0.1:4444") == 4, log
    assert "failed" not in log


def test_connect_timeout_closes_the_client(testbed):
    host = testbed.host("lo")
    # SYNs to port 9 vanish: the upstream neither accepts nor refuses.
    host.run(["nft", "-f", "-"], input=(
        "table ip blackhole {\n"
        "  chain input {\n"
        "    type filter hook input priority 0; policy accept;\n"
        "    tcp dport 9 drop\n"
        "  }\n"
        "}\n"))
    client = start_proxy(host, "-m", "client", "-p", str(CLIENT), "-r", "127.0.0.1:9",
                         "--connect-timeout", "1", port=CLIENT)
    assert_closed_without_data(host)
    log = stop_cleanly(client)
    assert "upstream 127.0.0.1:9 failed: timed out" in log, log
