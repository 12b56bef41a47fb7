"""The firewall rules during a drain: new connections stop being diverted at the stop
signal, but what the open ones need stays until the last has ended: the delivery of the
service's replies to --source client's transparent upstream sockets, and of an intercepted
connection's packets to its socket (-t tproxy). Removed at the signal, they left every
draining connection without its packets."""

from __future__ import annotations

import os
import signal
import sys

import pytest
from netns import TestBed, wait_until
from test_proxy_chain import CLIENT_PROXY, WHOAMI, Chain
from test_transparent import PROXY, SERVER_PROXY, SERVICE, start_proxy, two_paths

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(120)]

PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers.py")


def test_source_client_connections_keep_their_replies_through_the_drain(testbed: TestBed):
    chain = Chain(testbed, 4)
    echo = chain.svc.start([sys.executable, PEERS, "echo", str(WHOAMI)], name="echo")
    chain.svc.wait_listening(WHOAMI, proc=echo)
    server = chain.server_proxy(WHOAMI, "--accept-proxy", "--source", "client",
                                "--setup-firewall", "--drain-timeout", "20")
    chain.client_proxy("--send-proxy")
    echo_through_the_drain(chain.app.connect((chain.cpx_ip, CLIENT_PROXY), timeout=10),
                           server)
    assert "firewall: removed table inet mptcpproxy_4444" in server.stderr
    rules = chain.spx.run(["ip", "-4", "rule", "show"]).stdout
    assert "fwmark" not in rules, rules


def test_tproxy_connections_go_on_through_the_drain(testbed: TestBed):
    # lan - gw (client proxy, -t tproxy) == srv (server proxy, echo): the LAN host's
    # connection to srv is intercepted; it must go on after the gateway's SIGTERM.
    lan, gw, srv = testbed.host("lan"), testbed.host("gw"), testbed.host("srv")
    testbed.link(lan, gw, "10.123.220.2/24", "10.123.220.1/24")
    lan.route("default", via="10.123.220.1")
    gw.sysctl("net.ipv4.ip_forward", 1)
    srv_addr, _ = two_paths(testbed, gw, srv, 4)
    echo = srv.start([sys.executable, PEERS, "echo", str(SERVICE)], name="echo")
    srv.wait_listening(SERVICE, proc=echo)
    start_proxy(srv, "-m", "server", "-r", f"127.0.0.1:{SERVICE}", port=SERVER_PROXY,
                name="server-proxy")
    proxy = start_proxy(gw, "-m", "client", "-t", "tproxy", "--setup-firewall",
                        "--intercept", str(SERVER_PROXY), port=PROXY)
    echo_through_the_drain(lan.connect((srv_addr, SERVER_PROXY), timeout=10), proxy)
    assert "firewall: removed table inet mptcpproxy_5555" in proxy.stderr
    assert "mptcpproxy" not in gw.run(["nft", "list", "tables"]).stdout


def echo_through_the_drain(app, proxy) -> None:
    """An echo before and after the proxy's SIGTERM on `app`; the proxy then exits 0."""
    try:
        app.sendall(b"before")
        assert app.recv(100) == b"before"
        proxy.send_signal(signal.SIGTERM)
        wait_until(lambda: "draining 1 open connection" in proxy.stderr, 10, "the drain")
        app.sendall(b"during the drain")
        assert app.recv(100) == b"during the drain", proxy.stderr
    finally:
        app.close()
    assert proxy.wait(30) == 0, proxy.describe()
