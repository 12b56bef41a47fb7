"""--source client during a drain: the rules that deliver the service's replies to the
proxy's transparent upstream sockets stay until the last connection has ended (removed at
the stop signal, they left every draining connection without its replies)."""

from __future__ import annotations

import os
import signal
import sys

import pytest
from netns import TestBed, wait_until
from test_proxy_chain import CLIENT_PROXY, WHOAMI, Chain

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(120)]

PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers.py")


def test_source_client_connections_keep_their_replies_through_the_drain(testbed: TestBed):
    chain = Chain(testbed, 4)
    echo = chain.svc.start([sys.executable, PEERS, "echo", str(WHOAMI)], name="echo")
    chain.svc.wait_listening(WHOAMI, proc=echo)
    server = chain.server_proxy(WHOAMI, "--accept-proxy", "--source", "client",
                                "--setup-firewall", "--drain-timeout", "20")
    chain.client_proxy("--send-proxy")
    app = chain.app.connect((chain.cpx_ip, CLIENT_PROXY), timeout=10)
    try:
        app.sendall(b"before")
        assert app.recv(100) == b"before"
        server.send_signal(signal.SIGTERM)
        wait_until(lambda: "draining 1 open connection" in server.stderr, 10, "the drain")
        app.sendall(b"during the drain")
        assert app.recv(100) == b"during the drain", server.stderr
    finally:
        app.close()
    assert server.wait(30) == 0, server.describe()
    assert "firewall: removed table inet mptcpproxy_4444" in server.stderr
    rules = chain.spx.run(["ip", "-4", "rule", "show"]).stdout
    assert "fwmark" not in rules, rules
