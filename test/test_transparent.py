"""Transparent mode on network namespaces: REDIRECT and TPROXY, client and server side.

Each test builds its hosts, runs the proxies as separate processes (`python -m
mptcpproxy`), sends a checksummed transfer (xfer.py) through them and reads the proxies'
connection-end log lines (`mptcp=yes subflows=2`) to see the leg between the hosts ran
MPTCP over both paths. The commands are those of docs/transparent.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import re
import signal
import sys
from pathlib import Path

import pytest
from netns import Host, Proc, TestBed, wait_until

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(120)]

XFER = str(Path(__file__).with_name("xfer.py"))
# the proxy processes import the same mptcpproxy as this test run
_SPEC = importlib.util.find_spec("mptcpproxy")
PROXY_ENV = {"PYTHONPATH": str(Path(_SPEC.origin).parent.parent)} if _SPEC and _SPEC.origin else {}

SIZE = 16 << 20  # long enough on the shaped paths for the second subflow to join, also when
# the whole suite loads both CPUs (6 MiB, half a second, ended once before the join: subflows=1)
PROXY, SERVER_PROXY, SERVICE = 5555, 4444, 5201
CONN_END = re.compile(r"conn (\d+) (\w+): client (\S+) upstream (\S+) sent (\d+) B "
                      r"received (\d+) B in \S+ s, (.*?)(?: paths=(.*))?$")


# -- helpers ------------------------------------------------------------------------------

def start_proxy(host: Host, *args: str, port: int, user: str | None = None,
                name: str = "proxy") -> Proc:
    """`mptcp-proxy ARGS -p PORT` in `host` (as `user` through setpriv), listening."""
    argv = [sys.executable, "-m", "mptcpproxy", *args, "-p", str(port)]
    if user:
        pw = pwd.getpwnam(user)
        argv = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups",
                *argv]
    proc = host.start(argv, name=name, env=PROXY_ENV)
    host.wait_listening(port, proc=proc)
    if "--setup-firewall" in args:  # the rules go in right after the listener
        wait_until(lambda: "firewall: installed" in proc.stderr or proc.poll() is not None,
                   10, "the firewall set-up")
        assert proc.poll() is None, proc.describe()
    return proc


def conn_ends(proc: Proc) -> list[dict]:
    """The proxy's connection-end log lines, parsed."""
    out = []
    for line in proc.stderr.splitlines():
        m = CONN_END.search(line)
        if m:
            out.append({"how": m[2], "client": m[3], "upstream": m[4], "sent": int(m[5]),
                        "received": int(m[6]), "mptcp": m[7], "paths": m[8]})
    return out


def wait_conn_end(proc: Proc, count: int = 1, timeout: float = 15) -> list[dict]:
    wait_until(lambda: len(conn_ends(proc)) >= count, timeout,
               f"{count} connection-end line(s) of {proc.name}")
    return conn_ends(proc)


def _last_json(proc_or_text) -> dict:
    text = proc_or_text if isinstance(proc_or_text, str) else proc_or_text.stdout
    lines = [line for line in text.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def transfer(bed: TestBed, sender: Host, host: str, port: int, receiver: Host,
             recv_port: int = SERVICE) -> None:
    """Send SIZE checksummed bytes from `sender` to host:port; `receiver` gets them on
    recv_port. Asserts they arrived intact."""
    recv = receiver.start([sys.executable, XFER, "--timeout", "20", "recv", str(recv_port)],
                          name="recv")
    receiver.wait_listening(recv_port, proc=recv)
    res = sender.run([sys.executable, XFER, "--timeout", "20", "send", host, str(port),
                      str(SIZE)], timeout=40, check=False)
    assert res.returncode == 0, f"send failed: {res.stderr}\n{bed.describe()}"
    assert recv.wait(20) == 0, bed.describe()
    sent, got = _last_json(res.stdout), _last_json(recv)
    assert got.get("bytes") == sent["bytes"] == SIZE, bed.describe()
    assert got["sha256"] == sent["sha256"]


def two_paths(bed: TestBed, a: Host, b: Host, family: int = 4) -> tuple[str, str]:
    """Two shaped links a - b; b announces its second address (MPTCP `signal`).

    Returns b's two addresses.
    """
    if family == 4:
        p1 = bed.link(a, b, "10.123.200.1/24", "10.123.200.2/24")
        p2 = bed.link(a, b, "10.123.201.1/24", "10.123.201.2/24")
    else:
        p1 = bed.link(a, b, "fd00:200::1/64", "fd00:200::2/64")
        p2 = bed.link(a, b, "fd00:201::1/64", "fd00:201::2/64")
    for link in (p1, p2):
        link.shape("100mbit", "32kb", "20ms")
    b.mptcp_limits(subflows=1)
    a.mptcp_limits(subflows=1, add_addr_accepted=1)
    b.mptcp_endpoint(p2.ip_b, p2.dev_b, "signal")
    return p1.ip_b, p2.ip_b


def assert_two_subflows(proc: Proc, upstream: str | None = None) -> dict:
    end = wait_conn_end(proc)[0]
    assert end["mptcp"] == "mptcp=yes subflows=2", proc.describe()
    if upstream:
        assert end["upstream"] == upstream, proc.describe()
    return end


def fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- (1) local REDIRECT, as the original's tproxy scripts ---------------------------------

def _local_redirect_bed(bed: TestBed, family: int = 4) -> tuple[Host, Host, str]:
    """cli ==two paths== srv; srv runs the server proxy in front of the real service."""
    cli, srv = bed.host("cli"), bed.host("srv")
    srv_addr, _ = two_paths(bed, cli, srv, family)
    start_proxy(srv, "-m", "server", "-r", f"127.0.0.1:{SERVICE}", port=SERVER_PROXY,
                name="server-proxy")
    return cli, srv, srv_addr


@pytest.mark.parametrize("family", [4, 6])
def test_local_redirect_mark(testbed: TestBed, family: int) -> None:
    """An application's connection to the server's real address is redirected (OUTPUT)
    to the client proxy, which skips its own connections by --mark (SO_ORIGINAL_DST:
    IPv4 at SOL_IP, IPv6 at SOL_IPV6)."""
    cli, srv, srv_addr = _local_redirect_bed(testbed, family)
    proxy = start_proxy(cli, "-m", "client", "-t", "--mark", "1", "--setup-firewall",
                        "--intercept", str(SERVER_PROXY), port=PROXY)
    transfer(testbed, cli, srv_addr, SERVER_PROXY, srv)
    end = assert_two_subflows(proxy, upstream=fmt(srv_addr, SERVER_PROXY))
    assert end["sent"] == SIZE


def test_local_redirect_uid_owner(testbed: TestBed) -> None:
    """The original's way: the proxy runs as its own user (here `nobody`, no privileges)
    and an iptables OUTPUT rule skips that user's connections."""
    cli, srv, srv_addr = _local_redirect_bed(testbed)
    # the kernel opens MPTCP's additional subflows as root, not as the proxy's user: a SYN
    # that carries an MPTCP option (kind 30) is the proxy's own too
    cli.run(["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport",
             str(SERVER_PROXY), "-m", "tcp", "!", "--tcp-option", "30", "-m", "owner", "!",
             "--uid-owner", "nobody", "-j", "REDIRECT", "--to-ports", str(PROXY)])
    proxy = start_proxy(cli, "-m", "client", "-t", port=PROXY, user="nobody")
    transfer(testbed, cli, srv_addr, SERVER_PROXY, srv)
    assert_two_subflows(proxy, upstream=fmt(srv_addr, SERVER_PROXY))
    with open(f"/proc/{proxy.pid}/status") as f:
        uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
    assert set(uids) == {str(pwd.getpwnam("nobody").pw_uid)}


# -- (2) gateway TPROXY: a LAN host behind a router that runs the client proxy -------------

@pytest.mark.parametrize("family", [4, 6])
def test_gateway_tproxy(testbed: TestBed, family: int) -> None:
    """lan - gw ==two paths== srv: the LAN host's connection to the server's address is
    intercepted by the gateway (TPROXY) and carried over MPTCP with two subflows."""
    lan, gw, srv = testbed.host("lan"), testbed.host("gw"), testbed.host("srv")
    if family == 4:
        testbed.link(lan, gw, "10.123.220.2/24", "10.123.220.1/24")
        lan.route("default", via="10.123.220.1")
        gw.sysctl("net.ipv4.ip_forward", 1)
    else:
        testbed.link(lan, gw, "fd00:220::2/64", "fd00:220::1/64")
        lan.ip("-6", "route", "add", "default", "via", "fd00:220::1")
        gw.sysctl("net.ipv6.conf.all.forwarding", 1)
    srv_addr, _ = two_paths(testbed, gw, srv, family)
    # srv has no route back to the LAN: only an intercepted connection can succeed
    start_proxy(srv, "-m", "server", "-r", f"127.0.0.1:{SERVICE}", port=SERVER_PROXY,
                name="server-proxy")
    proxy = start_proxy(gw, "-m", "client", "-t", "tproxy", "--setup-firewall",
                        "--intercept", str(SERVER_PROXY), port=PROXY)
    transfer(testbed, lan, srv_addr, SERVER_PROXY, srv)
    end = assert_two_subflows(proxy, upstream=fmt(srv_addr, SERVER_PROXY))
    assert end["client"].startswith("10.123.220.2:" if family == 4 else "[fd00:220::2]:")


# -- (3) transparent server: MPTCP crossing the server-side gateway becomes TCP ------------

@pytest.mark.parametrize(("method", "family"), [("redirect", 4), ("tproxy", 4),
                                                ("redirect", 6)])
def test_transparent_server(testbed: TestBed, method: str, family: int) -> None:
    """cli ==two paths== sgw - web: MPTCP connections to web:8080 crossing the gateway are
    intercepted there and forwarded as TCP to web:8080. redirect: the original destination
    comes from conntrack (SO_ORIGINAL_DST fails on MPTCP sockets). tproxy: the proxy listens
    on the intercepted port itself, since the kernel accepts an MP_JOIN only on a listener
    with the connection's own port."""
    cli, sgw, web = testbed.host("cli"), testbed.host("sgw"), testbed.host("web")
    sgw_addr, _ = two_paths(testbed, cli, sgw, family)
    if family == 4:
        web_addr = "10.123.230.2"
        testbed.link(sgw, web, "10.123.230.1/24", f"{web_addr}/24")
        web.route("default", via="10.123.230.1")
        cli.route("10.123.230.0/24", via=sgw_addr)
        sgw.sysctl("net.ipv4.ip_forward", 1)
    else:
        web_addr = "fd00:230::2"
        testbed.link(sgw, web, "fd00:230::1/64", f"{web_addr}/64")
        web.ip("-6", "route", "add", "default", "via", "fd00:230::1")
        cli.ip("-6", "route", "add", "fd00:230::/64", "via", sgw_addr)
        sgw.sysctl("net.ipv6.conf.all.forwarding", 1)
    web_port = 8080
    web_target = fmt(web_addr, web_port)
    server = start_proxy(sgw, "-m", "server", "-t", method, "--setup-firewall",
                         "--intercept", str(web_port),
                         port=web_port if method == "tproxy" else SERVER_PROXY,
                         name="server-proxy")
    # an MPTCP client: a (plain, non-transparent) client proxy aimed at the real server
    client = start_proxy(cli, "-m", "client", "-r", web_target, port=PROXY)
    transfer(testbed, cli, "127.0.0.1", PROXY, web, recv_port=web_port)
    assert_two_subflows(client, upstream=web_target)
    end = assert_two_subflows(server, upstream=web_target)
    assert end["sent"] == SIZE  # client -> web: the a->b direction of the relay


# -- (3b) the gateway's own services: delivered, never proxied ------------------------------

WHOAMI = """
import socket, sys
srv = socket.create_server(("0.0.0.0", int(sys.argv[1])))
srv.settimeout(20)
print("listening", flush=True)
for _ in range(int(sys.argv[2])):
    conn, peer = srv.accept()
    conn.sendall(peer[0].encode())
    conn.close()
srv.close()
"""

ASK = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.settimeout(10)
data = b""
while chunk := s.recv(100):
    data += chunk
s.close()
print(data.decode())
"""
OWN_SERVICE = 2222


def ask_whoami(bed: TestBed, client: Host, addresses: list[str]) -> list[str]:
    """The peer address a service on OWN_SERVICE of `bed`'s gateway saw for each of
    `client`'s connections to `addresses`."""
    return [client.run([sys.executable, "-c", ASK, addr, str(OWN_SERVICE)], timeout=20
                       ).stdout.strip() for addr in addresses]


def test_gateway_services_client(testbed: TestBed) -> None:
    """lan - gw - far: the client proxy on gw intercepts all TCP (-t redirect, no
    --intercept). A LAN connection to a service on one of gw's own addresses reaches it
    directly (the service sees the LAN host, not gw), while a connection to far is still
    intercepted and proxied (far has no route back to the LAN)."""
    lan, gw, far = testbed.host("lan"), testbed.host("gw"), testbed.host("far")
    testbed.link(lan, gw, "10.123.220.2/24", "10.123.220.1/24")
    testbed.link(gw, far, "10.123.250.1/24", "10.123.250.2/24")
    lan.route("default", via="10.123.220.1")
    gw.sysctl("net.ipv4.ip_forward", 1)
    proxy = start_proxy(gw, "-m", "client", "-t", "redirect", "--setup-firewall", port=PROXY)
    own = gw.start([sys.executable, "-c", WHOAMI, str(OWN_SERVICE), "2"], name="whoami")
    gw.wait_listening(OWN_SERVICE, proc=own)
    assert ask_whoami(testbed, lan, ["10.123.220.1", "10.123.250.1"]) == [
        "10.123.220.2", "10.123.220.2"], proxy.describe()
    assert conn_ends(proxy) == []
    transfer(testbed, lan, "10.123.250.2", SERVICE, far)
    end = wait_conn_end(proxy)[0]
    assert end["client"].startswith("10.123.220.2:"), proxy.describe()
    assert end["upstream"] == fmt("10.123.250.2", SERVICE)


def test_gateway_services_server(testbed: TestBed) -> None:
    """cli ==two paths== sgw - web, the transparent server on sgw intercepting all TCP: a
    plain TCP connection to a service on sgw's own address reaches it directly, while
    MPTCP to web is intercepted, its join to sgw's announced address included (two
    subflows)."""
    cli, sgw, web = testbed.host("cli"), testbed.host("sgw"), testbed.host("web")
    sgw_addr, sgw_addr2 = two_paths(testbed, cli, sgw)
    testbed.link(sgw, web, "10.123.230.1/24", "10.123.230.2/24")
    web.route("default", via="10.123.230.1")
    cli.route("10.123.230.0/24", via=sgw_addr)
    sgw.sysctl("net.ipv4.ip_forward", 1)
    server = start_proxy(sgw, "-m", "server", "-t", "redirect", "--setup-firewall",
                         port=SERVER_PROXY, name="server-proxy")
    own = sgw.start([sys.executable, "-c", WHOAMI, str(OWN_SERVICE), "2"], name="whoami")
    sgw.wait_listening(OWN_SERVICE, proc=own)
    assert ask_whoami(testbed, cli, [sgw_addr, sgw_addr2]) == [
        "10.123.200.1", "10.123.201.1"], server.describe()
    assert conn_ends(server) == []
    web_target = fmt("10.123.230.2", 8080)
    client = start_proxy(cli, "-m", "client", "-r", web_target, port=PROXY)
    transfer(testbed, cli, "127.0.0.1", PROXY, web, recv_port=8080)
    assert_two_subflows(client, upstream=web_target)
    assert_two_subflows(server, upstream=web_target)


# -- (4) teardown: SIGTERM leaves the firewall exactly as it was; leftovers are replaced --

def firewall_state(host: Host) -> dict[str, str]:
    cmds = {"nft": ["nft", "list", "ruleset"], "rule4": ["ip", "-4", "rule"],
            "rule6": ["ip", "-6", "rule"], "route4": ["ip", "-4", "route", "show", "table", "all"],
            "route6": ["ip", "-6", "route", "show", "table", "all"]}
    # Routes the kernel adds itself (link-local and multicast ones appear once IPv6 duplicate
    # address detection ends, at any moment of the test) are not the proxy's doing.
    return {key: "".join(line for line in host.run(argv).stdout.splitlines(keepends=True)
                         if "proto kernel" not in line)
            for key, argv in cmds.items()}


@pytest.mark.parametrize("method", ["tproxy", "redirect"])
def test_teardown(testbed: TestBed, method: str) -> None:
    fw = testbed.host("fw")
    testbed.link(fw, testbed.host("peer"), "10.123.240.1/24", "10.123.240.2/24")
    before = firewall_state(fw)
    args = ("-m", "client", "-t", method, "--mark", "7", "--setup-firewall",
            "--intercept", "80,443,8000-8100")

    # a crashed run (SIGKILL) leaves its rules behind ...
    crashed = start_proxy(fw, *args, port=PROXY, name="crashed")
    during = firewall_state(fw)
    assert f"table inet mptcpproxy_{PROXY}" in during["nft"]
    os.kill(crashed.pid, signal.SIGKILL)
    crashed.wait(10)
    assert firewall_state(fw) == during

    # ... and the next start replaces them: the same state, nothing doubled
    proxy = start_proxy(fw, *args, port=PROXY)
    assert firewall_state(fw) == during
    if method == "tproxy":
        assert during["rule4"].count("lookup") == before["rule4"].count("lookup") + 1
        assert during["rule6"].count("lookup") == before["rule6"].count("lookup") + 1
    proxy.send_signal(signal.SIGTERM)
    assert proxy.wait(15) == 0, proxy.describe()
    assert firewall_state(fw) == before, proxy.describe()
    assert "firewall: removed" in proxy.stderr


# -- (5) loop: a redirected connection to the proxy's own port is refused -----------------

PROBE = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.settimeout(5)
try:
    print("eof" if s.recv(1) == b"" else "data")
except ConnectionResetError:
    print("reset")
"""


# rules written by hand that, unlike --setup-firewall's, also catch this host's addresses
LOOSE_RULES = f"""
table ip handmade {{
\tchain prerouting {{
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\ttcp dport {PROXY} redirect to :{PROXY}
\t}}
}}
"""


@pytest.mark.parametrize("rules", ["handmade", "setup-firewall"])
def test_loop_refused(testbed: TestBed, rules: str) -> None:
    """A gateway intercepting port 5555 (its own). With hand-written rules that catch the
    gateway's own addresses too, a LAN connection to the gateway's other address on 5555
    is redirected to the proxy with its own port as the original destination: it is
    refused and logged as a loop, never relayed. --setup-firewall's rules leave the
    gateway's addresses alone: both connections come straight to the listener."""
    lan, gw = testbed.host("lan"), testbed.host("gw")
    testbed.link(lan, gw, "10.123.220.2/24", "10.123.220.1/24")
    testbed.link(gw, testbed.host("wan"), "10.123.250.1/24", "10.123.250.2/24")
    lan.route("default", via="10.123.220.1")
    if rules == "handmade":
        gw.run(["nft", "-f", "-"], input=LOOSE_RULES)
        proxy = start_proxy(gw, "-m", "client", "-t", port=PROXY)
    else:
        proxy = start_proxy(gw, "-m", "client", "-t", "--setup-firewall", "--intercept",
                            str(PROXY), port=PROXY)
    for addr in ("10.123.250.1", "10.123.220.1"):
        res = lan.run([sys.executable, "-c", PROBE, addr, str(PROXY)], timeout=15)
        assert res.stdout.strip() in ("eof", "reset"), res.stdout + res.stderr
    wait_until(lambda: proxy.stderr.count("refused") >= 2, 10, "two refusals")
    if rules == "handmade":
        assert "10.123.250.1:5555 is this proxy's own listener (a loop)" in proxy.stderr
    else:
        assert "came straight to the listener 10.123.250.1:5555" in proxy.stderr
    assert "came straight to the listener 10.123.220.1:5555" in proxy.stderr
    assert "upstream" not in proxy.stderr, proxy.describe()
    assert proxy.poll() is None


def test_setup_firewall_refused_without_cap_net_admin(testbed: TestBed) -> None:
    """Without CAP_NET_ADMIN, --setup-firewall is refused in one sentence, exit code 1."""
    host = testbed.host("h")
    env = [f"{k}={v}" for k, v in PROXY_ENV.items()]
    nobody = pwd.getpwnam("nobody")
    res = host.run(["env", *env, "setpriv", f"--reuid={nobody.pw_uid}",
                    f"--regid={nobody.pw_gid}", "--clear-groups", sys.executable, "-m",
                    "mptcpproxy", "-m", "client",
                    "-p", str(PROXY), "-t", "--setup-firewall"], check=False, timeout=20)
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[-1] == ("mptcp-proxy: error: --setup-firewall needs CAP_NET_ADMIN, which this "
                         "process lacks: run it as root, or install the rules yourself "
                         "(--print-firewall shows them) and leave out --setup-firewall")
    assert "Traceback" not in res.stderr
