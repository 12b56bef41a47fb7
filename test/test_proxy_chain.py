"""Keeping the client's address end to end, against real peers, in network namespaces:

    app --TCP--> client proxy --MPTCP--> server proxy --TCP--> service
    (10.77.1.2)  (cpx, --send-proxy)     (spx, --accept-proxy)  (svc)

The service is nginx (`listen ... proxy_protocol`, logging $proxy_protocol_addr) or HAProxy
(`bind ... accept-proxy`, logging %ci) behind `--send-proxy`, or a plain TCP service that
reports its peer, behind `--source client`. Each test asserts what the service logged or
saw: the app's own address. nginx and HAProxy run as our own processes with their own
configuration and prefix inside the namespaces, never as the system's services.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import textwrap

import pytest
from netns import Host, Proc, TestBed, wait_until
from test_transparent import start_proxy

from mptcpproxy.proxyproto import encode_v1, encode_v2

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(120)]

CLIENT_PROXY, SERVER_PROXY, NGINX, HAPROXY, WHOAMI, FRONT = 5555, 4444, 8080, 8081, 7000, 8000
CONN_END = re.compile(r"conn \d+ (\w+): client (\S+)(?: via (\S+))? upstream (\S+) sent (\d+) "
                      r"B received (\d+) B in \S+ s, (.*?)(?: paths=(.*))?$")

ADDRS = {  # per IP version: app, cpx (app side), cpx (MPTCP side), spx, spx (service side), svc
    4: ("10.77.1.2", "10.77.1.1", "10.77.2.1", "10.77.2.2", "10.77.3.1", "10.77.3.2", 24),
    6: ("fd77:1::2", "fd77:1::1", "fd77:2::1", "fd77:2::2", "fd77:3::1", "fd77:3::2", 64),
}


def need(tool: str) -> None:
    if shutil.which(tool, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"])):
        return
    why = f"needs {tool} (make deps installs it)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(why)
    pytest.skip(why)


def fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Chain:
    """Four hosts in a row: app - cpx - spx - svc; svc routes everything back via spx."""

    def __init__(self, bed: TestBed, family: int) -> None:
        self.bed, self.family = bed, family
        app, cpx_a, cpx_m, spx_m, spx_s, svc, plen = ADDRS[family]
        self.app_ip, self.cpx_ip, self.spx_ip, self.svc_ip = app, cpx_a, spx_m, svc
        self.cpx_mptcp_ip = cpx_m  # the client proxy's side of the MPTCP leg
        self.app, self.cpx = bed.host("app"), bed.host("cpx")
        self.spx, self.svc = bed.host("spx"), bed.host("svc")
        bed.link(self.app, self.cpx, f"{app}/{plen}", f"{cpx_a}/{plen}")
        bed.link(self.cpx, self.spx, f"{cpx_m}/{plen}", f"{spx_m}/{plen}")
        bed.link(self.spx, self.svc, f"{spx_s}/{plen}", f"{svc}/{plen}")
        self.svc.ip(*(["-6"] if family == 6 else []), "route", "add", "default", "via", spx_s)
        self.spx_mptcp = spx_m

    def client_proxy(self, *args: str) -> Proc:
        return start_proxy(self.cpx, "-m", "client", "-r", fmt(self.spx_mptcp, SERVER_PROXY),
                           *args, port=CLIENT_PROXY, name="client-proxy")

    def server_proxy(self, upstream_port: int, *args: str) -> Proc:
        return start_proxy(self.spx, "-m", "server", "-r", fmt(self.svc_ip, upstream_port),
                           *args, port=SERVER_PROXY, name="server-proxy")

    def get(self, host: Host | None = None, addr: str | None = None,
            port: int = CLIENT_PROXY, prefix: bytes = b"") -> str:
        """An HTTP request from `host` (the app) to addr:port, `prefix` in the same send()."""
        host, addr = host or self.app, addr or self.cpx_ip
        res = host.run([sys.executable, "-c", _GET, addr, str(port), prefix.hex()], timeout=30)
        return res.stdout


_GET = textwrap.dedent("""\
    import socket, sys
    sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(bytes.fromhex(sys.argv[3]) + b"GET / HTTP/1.0\\r\\nHost: t\\r\\n\\r\\n")
    out = b""
    try:
        while data := sock.recv(65536):
            out += data
    except ConnectionResetError:
        out += b"(reset)"
    print(out.decode("latin-1"))
    """)


def start_nginx(bed: TestBed, host: Host, addr: str) -> tuple[Proc, str]:
    """nginx on addr:NGINX with `proxy_protocol`, logging `$proxy_protocol_addr`, in its
    own prefix; returns the process and its access log's path."""
    need("nginx")
    prefix = os.path.join(bed.log_dir, "nginx")
    os.makedirs(prefix, exist_ok=True)
    conf = os.path.join(prefix, "nginx.conf")
    temp = " ".join(f"{kind}_temp_path {prefix}/{kind};"
                    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    with open(conf, "w") as f:
        f.write(textwrap.dedent(f"""\
            daemon off;
            master_process off;
            pid {prefix}/nginx.pid;
            error_log stderr notice;
            events {{ worker_connections 64; }}
            http {{
                log_format pp '$proxy_protocol_addr $proxy_protocol_port '
                              '$proxy_protocol_server_addr $remote_addr "$request" $status';
                access_log {prefix}/access.log pp;
                {temp}
                server {{
                    listen {fmt(addr, NGINX)} proxy_protocol;
                    location / {{ return 200 "nginx ok\\n"; }}
                }}
            }}
            """))
    proc = host.start(["nginx", "-p", prefix, "-c", conf, "-e", "stderr"], name="nginx")
    host.wait_listening(NGINX, proc=proc)
    return proc, os.path.join(prefix, "access.log")


def start_haproxy(bed: TestBed, host: Host, bind: str, extra: str = "") -> Proc:
    """HAProxy 2.6 on `bind` with accept-proxy, answering itself and logging %ci:%cp to
    stdout; `extra`: more sections."""
    need("haproxy")
    conf = os.path.join(bed.log_dir, f"haproxy-{host.label}.cfg")
    with open(conf, "w") as f:
        f.write(textwrap.dedent("""\
            global
                log stdout format raw local0 info
            defaults
                log global
                timeout connect 5s
                timeout client 20s
                timeout server 20s
            """) + textwrap.dedent(f"""\
            frontend fe
                mode http
                bind {bind} accept-proxy
                log-format "client=%ci:%cp frontend=%fi:%fp status=%ST"
                http-request return status 200 content-type text/plain string "haproxy ok"
            """) + textwrap.dedent(extra))
    proc = host.start(["haproxy", "-db", "-f", conf], name="haproxy")
    host.wait_listening(int(bind.rsplit(":", 1)[1]), proc=proc)
    return proc


def access_lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def wait_access(path: str, count: int = 1) -> list[str]:
    wait_until(lambda: len(access_lines(path)) >= count, 10, "nginx's access log line")
    return access_lines(path)


def host_of(address: str) -> str:
    """The host of a logged `host:port` or `[host]:port`."""
    return address.rsplit(":", 1)[0].strip("[]")


def conn_ends(proc: Proc) -> list[dict]:
    out = []
    for line in proc.stderr.splitlines():
        m = CONN_END.search(line)
        if m:
            out.append({"how": m[1], "client": m[2], "via": m[3], "upstream": m[4],
                        "mptcp": m[7]})
    return out


def wait_conn_end(proc: Proc) -> dict:
    wait_until(lambda: conn_ends(proc), 15, f"a connection-end line of {proc.name}")
    return conn_ends(proc)[0]


# -- --send-proxy to services that read the header ------------------------------------------

@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_chain_to_nginx(testbed: TestBed, family: int, version: str) -> None:
    """nginx logs the app's address as $proxy_protocol_addr, through client proxy
    --send-proxy -> MPTCP -> server proxy --accept-proxy --send-proxy."""
    chain = Chain(testbed, family)
    _, log = start_nginx(testbed, chain.svc, chain.svc_ip)
    server = chain.server_proxy(NGINX, "--accept-proxy", f"--send-proxy={version}")
    client = chain.client_proxy(f"--send-proxy={version}")
    assert "nginx ok" in chain.get()
    (line,) = wait_access(log)
    print(f"nginx access log ({version}, IPv{family}): {line}")
    assert line.split()[0] == chain.app_ip, line
    assert line.split()[2] == chain.cpx_ip, line  # the address the app connected to
    end = wait_conn_end(server)
    assert host_of(end["client"]) == chain.app_ip, server.stderr
    assert host_of(end["via"]) == chain.cpx_mptcp_ip, server.stderr
    assert end["mptcp"].startswith("mptcp=yes"), server.stderr
    assert wait_conn_end(client)["mptcp"].startswith("mptcp=yes"), client.stderr


@pytest.mark.parametrize(("version", "family"), [("v1", 4), ("v2", 4), ("v2", 6)])
def test_chain_to_haproxy(testbed: TestBed, version: str, family: int) -> None:
    """HAProxy (bind ... accept-proxy) logs the app's address and port as %ci:%cp."""
    chain = Chain(testbed, family)
    haproxy = start_haproxy(testbed, chain.svc, fmt(chain.svc_ip, HAPROXY))
    chain.server_proxy(HAPROXY, "--accept-proxy", f"--send-proxy={version}")
    chain.client_proxy(f"--send-proxy={version}")
    assert "haproxy ok" in chain.get()
    wait_until(lambda: "client=" in haproxy.stdout, 10, "HAProxy's log line")
    line = next(s for s in haproxy.stdout.splitlines() if s.startswith("client="))
    print(f"HAProxy log ({version}, IPv{family}): {line}")
    assert line.startswith(f"client={chain.app_ip}:"), line


def test_haproxy_send_proxy_v2_in_front(testbed: TestBed) -> None:
    """HAProxy's own send-proxy-v2 in front of the client proxy: app -> HAProxy -> client
    proxy --accept-proxy --send-proxy -> MPTCP -> server proxy -> nginx, which still logs
    the app's address."""
    chain = Chain(testbed, 4)
    _, log = start_nginx(testbed, chain.svc, chain.svc_ip)
    chain.server_proxy(NGINX, "--accept-proxy", "--send-proxy")
    client = chain.client_proxy("--accept-proxy", "--send-proxy")
    start_haproxy(testbed, chain.cpx, "127.0.0.1:9", extra=f"""\
        frontend front
            mode tcp
            bind {chain.cpx_ip}:{FRONT}
            default_backend cp
        backend cp
            mode tcp
            server cp 127.0.0.1:{CLIENT_PROXY} send-proxy-v2
        """)
    assert "nginx ok" in chain.get(port=FRONT)
    (line,) = wait_access(log)
    assert line.split()[0] == chain.app_ip, line
    assert wait_conn_end(client)["via"].startswith("127.0.0.1:"), client.stderr


def test_local_header_and_one_segment(testbed: TestBed) -> None:
    """Straight to the server proxy from the client proxy's host: a v2 LOCAL header keeps
    the real endpoints (nginx logs the sender), and a v1 header with the request in the same
    segment passes the claimed address on and the request intact."""
    chain = Chain(testbed, 4)
    _, log = start_nginx(testbed, chain.svc, chain.svc_ip)
    chain.server_proxy(NGINX, "--accept-proxy", "--send-proxy")
    local = encode_v2(None, None, command="LOCAL")
    assert "nginx ok" in chain.get(chain.cpx, chain.spx_ip, SERVER_PROXY, local)
    claimed = encode_v1(("192.0.2.77", 4242), ("192.0.2.1", 80))
    assert "nginx ok" in chain.get(chain.cpx, chain.spx_ip, SERVER_PROXY, claimed)
    first, second = wait_access(log, 2)
    assert first.split()[0] == chain.cpx_mptcp_ip, first  # the sender itself
    assert second.split()[:2] == ["192.0.2.77", "4242"], second
    assert second.endswith('"GET / HTTP/1.0" 200'), second


_SCRAPE = textwrap.dedent("""\
    import sys, urllib.request
    print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())
    """)

_PLAIN_AND_SLOW = textwrap.dedent("""\
    import socket, sys, time
    addr = (sys.argv[1], int(sys.argv[2]))
    def closed(sock):
        sock.settimeout(15)
        try:
            return sock.recv(16) == b""
        except ConnectionResetError:
            return True
    plain = socket.create_connection(addr, timeout=10)
    plain.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
    print("plain closed", closed(plain))
    slow = socket.create_connection(addr, timeout=10)
    sent = 0
    try:
        for byte in bytes.fromhex(sys.argv[3]):
            slow.send(bytes((byte,)))
            sent += 1
            time.sleep(0.25)
    except OSError:
        pass
    print("slow closed", closed(slow), "after", sent, "bytes")
    """)


def test_plain_and_slow_clients_rejected(testbed: TestBed) -> None:
    """Plain HTTP to an --accept-proxy listener is closed without a reply at its first
    byte; a header sent one byte per 250 ms is closed at the deadline; nothing reaches
    nginx; the metric counts both by reason."""
    chain = Chain(testbed, 4)
    _, log = start_nginx(testbed, chain.svc, chain.svc_ip)
    server = chain.server_proxy(NGINX, "--accept-proxy", "--proxy-timeout", "1",
                                "--metrics", "127.0.0.1:9541")
    header = encode_v2(("192.0.2.77", 4242), ("192.0.2.1", 80)).hex()
    out = chain.cpx.run([sys.executable, "-c", _PLAIN_AND_SLOW, chain.spx_ip,
                         str(SERVER_PROXY), header], timeout=60).stdout
    assert "plain closed True" in out, out
    slow = re.search(r"slow closed True after (\d+) bytes", out)
    assert slow and int(slow[1]) < 28, out
    metrics = chain.spx.run([sys.executable, "-c", _SCRAPE,
                             "http://127.0.0.1:9541/metrics"]).stdout
    for reason in ("signature", "timeout"):
        assert (f'mptcpproxy_proxy_header_errors_total{{listener="{SERVER_PROXY}",'
                f'reason="{reason}"}} 1.0') in metrics, metrics
    assert access_lines(log) == []
    assert "closed without a reply: not a PROXY header: first byte b'G'" in server.stderr


# -- --source client: a plain TCP service sees the app as its peer --------------------------

_WHOAMI = textwrap.dedent("""\
    import socket, sys
    fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
    srv = socket.socket(fam)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((sys.argv[1], int(sys.argv[2])))
    srv.listen(16)
    while True:
        conn, peer = srv.accept()
        print("peer", peer[0], flush=True)
        conn.settimeout(10)
        request = b""
        while b"\\r\\n\\r\\n" not in request and (data := conn.recv(4096)):
            request += data  # all of it: a close with unread bytes would be a reset
        conn.sendall(f"you are {peer[0]}\\r\\n".encode())
        conn.close()
    """)


def start_whoami(chain: Chain) -> Proc:
    proc = chain.svc.start([sys.executable, "-c", _WHOAMI, chain.svc_ip, str(WHOAMI)],
                           name="whoami")
    chain.svc.wait_listening(WHOAMI, proc=proc)
    return proc


@pytest.mark.parametrize(("family", "header"), [(4, True), (6, True), (4, False)],
                         ids=["ipv4", "ipv6", "ipv4-no-header"])
def test_source_client_with_the_rules(testbed: TestBed, family: int, header: bool) -> None:
    """Server proxy --accept-proxy --source client --setup-firewall: the service's peer is
    the app itself (without headers: the MPTCP peer, the client proxy); the rules are gone
    after the proxy stopped."""
    chain = Chain(testbed, family)
    whoami = start_whoami(chain)
    server = chain.server_proxy(WHOAMI, *(["--accept-proxy"] if header else []), "--source",
                                "client", "--setup-firewall", "--connect-timeout", "5")
    chain.client_proxy(*(["--send-proxy"] if header else []))
    expected = chain.app_ip if header else chain.cpx_mptcp_ip
    assert f"you are {expected}" in chain.get(), server.stderr
    assert f"peer {expected}" in whoami.stdout
    assert "no rule here delivers" not in server.stderr
    server.stop()
    assert "firewall: removed table inet mptcpproxy_4444" in server.stderr
    rules = chain.spx.run(["ip", "-4" if family == 4 else "-6", "rule", "show"]).stdout
    assert "fwmark" not in rules, rules


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_source_client_without_the_rules(testbed: TestBed, family: int) -> None:
    """No rules: a warning at the start with the command that prints them; each connect
    fails at --connect-timeout with a line naming the likely cause, and the app's
    connection is closed, not left hanging."""
    chain = Chain(testbed, family)
    start_whoami(chain)
    server = chain.server_proxy(WHOAMI, "--accept-proxy", "--source", "client",
                                "--connect-timeout", "2")
    assert "--source client: no rule here delivers the service's replies" in server.stderr
    assert "--source client --print-firewall" in server.stderr
    chain.client_proxy("--send-proxy")
    assert "you are" not in chain.get()
    wait_until(lambda: "upstream" in server.stderr and "timed out (--source client:" in
               server.stderr, 15, "the connect failure line")
    line = next(s for s in server.stderr.splitlines() if "timed out (--source client" in s)
    assert f"from {fmt(chain.app_ip, 0)[:-1]}" in line, line  # the app, via the client proxy
