"""Where MPTCP joins can arrive at a server proxy, on network namespaces: a proxy bound to
one address (-b) gets no join at its other announced addresses, and with
net.mptcp.allow_join_initial_addr_port=0 (the C flag) none at the address the client
connected to. The start-up log and `mptcp-proxy --check -m server [-b ADDR]` say so, with
the fix; the connection-end log lines show that they are right (subflows=1 against 2).
"""

from __future__ import annotations

import sys

import pytest
from netns import TestBed, wait_until
from test_transparent import PROXY_ENV, start_proxy, transfer, two_paths, wait_conn_end

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(120)]

PROXY, SERVER_PROXY, SERVICE = 5555, 4444, 5201


def check(host, *args: str) -> tuple[int, str]:
    """`mptcp-proxy --check ARGS` in `host`: exit code and stdout (stderr must be empty)."""
    env = [f"{k}={v}" for k, v in PROXY_ENV.items()]
    res = host.run(["env", *env, sys.executable, "-m", "mptcpproxy", "--check", *args],
                   check=False, timeout=20)
    assert res.stderr == "", res.stderr
    return res.returncode, res.stdout


def warnings(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if " WARNING " in line]


@pytest.mark.parametrize("case", ["bound", "wildcard", "bound-port-endpoint"])
def test_server_bound_to_one_address(testbed: TestBed, case: str) -> None:
    """cli ==two paths== srv, srv announcing its second address. Bound to the first
    address, the server proxy warns at start that joins to the second cannot arrive, and
    indeed its connection keeps one subflow. On the wildcard it has two, and no warning;
    so it has when bound but the announced endpoint has a port of its own (the kernel
    listens there: the other fix --check offers)."""
    cli, srv = testbed.host("cli"), testbed.host("srv")
    addr, addr2 = two_paths(testbed, cli, srv)
    if case == "bound-port-endpoint":
        srv.ip("mptcp", "endpoint", "flush")
        srv.ip("mptcp", "endpoint", "add", addr2, "dev", "eth1", "port", "4445", "signal")
    bound = ("-b", addr) if case != "wildcard" else ()
    server = start_proxy(srv, "-m", "server", *bound, "-r", f"127.0.0.1:{SERVICE}",
                         port=SERVER_PROXY, name="server-proxy")
    client = start_proxy(cli, "-m", "client", "-r", f"{addr}:{SERVER_PROXY}", port=PROXY)
    transfer(testbed, cli, "127.0.0.1", PROXY, srv)
    end = wait_conn_end(server)[0]
    rc, out = check(srv, "-m", "server", *bound)
    if case != "bound":
        assert end["mptcp"] == "mptcp=yes subflows=2", server.describe()
        assert warnings(server) == [], server.describe()
        assert rc == 0 and "only (-b):" not in out, out
        return
    assert end["mptcp"] == "mptcp=yes subflows=1", server.describe()
    assert wait_conn_end(client)[0]["mptcp"] == "mptcp=yes subflows=1"
    # the warning was logged at start, before the connection
    lines = warnings(server)
    assert len(lines) == 1, server.describe()
    for words in (f"listens on {addr} only (-b)", addr2, "fix: leave out -b", "firewall"):
        assert words in lines[0], lines[0]
    # --check says the same (a note: the client's own subflow endpoints could still join)
    assert rc == 0, out
    assert f"listens on {addr} only (-b)" in out and addr2 in out, out
    assert "    fix: leave out -b" in out, out
    assert f"     or: ip mptcp endpoint delete id 1 && ip mptcp endpoint add {addr2} dev eth1 " \
        "port PORT signal" in out, out


def test_check_c_flag_without_signal_endpoint(testbed: TestBed) -> None:
    """With net.mptcp.allow_join_initial_addr_port=0 a client may not join the address it
    connected to: without a signal endpoint no join can arrive at all. --check -m server
    says so with both fixes (exit 1), and so does the server proxy at start; with a
    signal endpoint the check passes."""
    srv, peer = testbed.host("srv"), testbed.host("peer")
    testbed.link(srv, peer, "10.123.230.1/24", "10.123.230.2/24")
    link2 = testbed.link(srv, peer, "10.123.231.1/24", "10.123.231.2/24")
    srv.mptcp_limits(subflows=2, add_addr_accepted=0)
    srv.sysctl("net.mptcp.allow_join_initial_addr_port", 0)
    rc, out = check(srv, "-m", "server")
    assert rc == 1, out
    assert "net.mptcp.allow_join_initial_addr_port = 0" in out, out  # the description
    assert "allow_join_initial_addr_port is 0" in out, out
    assert "fix: sysctl -w net.mptcp.allow_join_initial_addr_port=1" in out, out
    assert " or: ip mptcp endpoint add ADDR2 dev DEV2 signal" in out, out
    assert out.endswith("NOT possible: MPTCP connections use one path.\n"), out

    server = start_proxy(srv, "-m", "server", "-r", f"127.0.0.1:{SERVICE}",
                         port=SERVER_PROXY, name="server-proxy")
    wait_until(lambda: warnings(server), 10, "a start-up warning")
    assert "allow_join_initial_addr_port is 0" in warnings(server)[0], server.describe()
    assert "sysctl -w net.mptcp.allow_join_initial_addr_port=1" in warnings(server)[0]

    srv.mptcp_endpoint(link2.ip_a, link2.dev_a, "signal")
    rc, out = check(srv, "-m", "server")
    assert rc == 0, out
    assert "net.mptcp.allow_join_initial_addr_port = 0" in out, out
    assert out.endswith("extra subflows are possible.\n"), out
