"""The live view without namespaces: the `/connections` document (live.py) built from a fake
relay's ConnStats, served over HTTP with the status page at `/`; `mptcp-proxy --connections`
printing it; hostile values kept as text in the table and in a real browser's DOM."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import browser
import pytest
from test_metrics import uvloop_primed  # noqa: F401  (a module fixture)
from test_metrics_http import fetch, in_thread, with_server
from test_operations import echo_server, free_port, wait_for

from mptcpproxy import live, statuspage
from mptcpproxy.config import HostPort
from mptcpproxy.connlog import Conn
from mptcpproxy.connview import table
from mptcpproxy.metrics import Metrics
from mptcpproxy.relay._results import ConnStat, PathStat

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 30
HOSTILE = '<img src=x onerror="document.title=\'owned\'">'


def path(ident: int, local: str, remote: str, sent: int, received: int = 0,
         retrans: int = 0, rtt_us: int = 20000, closed: bool = False) -> PathStat:
    # acknowledged: what was sent less what was sent again
    return PathStat(ident, (local, 40000 + ident), (remote, 4444), sent, received, retrans,
                    rtt_us, closed, sent - retrans)


def stat(conn_id: int, paths: tuple = (), tag: int = 0, client: tuple | None = None,
         upstream: tuple | None = ("10.0.1.2", 4444), is_mptcp: bool = True,
         bytes_ab: int = 0, bytes_ba: int = 0, age: float = 1.5) -> ConnStat:
    sent = sum(p.bytes_sent for p in paths)
    return ConnStat(conn_id, tag, client, upstream, age, bytes_ab, bytes_ba, is_mptcp,
                    sum(not p.closed for p in paths), paths, sent,
                    sum(p.bytes_received for p in paths), sum(p.bytes_retrans for p in paths))


TWO_PATHS = (path(1, "10.0.1.1", "10.0.1.2", 600_000, 1000, 3000),
             path(2, "10.0.2.1", "10.0.2.2", 400_000, 500, 0, closed=True))


def fake_proxy(stats: list, conns: dict | None = None, connecting: tuple = ()) -> object:
    """What live.document reads of a control.Proxy."""
    lst = SimpleNamespace(title="5555", connecting=list(connecting),
                          config=SimpleNamespace(disable_mptcp=False))
    relay = SimpleNamespace(connections=lambda: stats)
    return SimpleNamespace(relay=relay, by_tag={0: lst}, conns=conns or {},
                           all_listeners=[lst])


def test_document_lists_the_pairs_with_their_paths_and_the_local_totals() -> None:
    origin = SimpleNamespace(client=("192.0.2.7", 999), via=("127.0.0.1", 5000))
    attempt = SimpleNamespace(conn_id=9, origin=origin, addr=("127.0.0.1", 5000),
                              target=HostPort("example.net", 80))
    doc = live.document(fake_proxy(
        [stat(3, TWO_PATHS, bytes_ab=1_000_000, bytes_ba=1500),
         stat(2, (), client=("::ffff:127.0.0.1", 6000), is_mptcp=False)],
        conns={3: Conn(("127.0.0.1", 5001), ("10.0.1.2", 4444), True)},
        connecting=(attempt,)))
    json.dumps(doc)  # what /connections sends
    c2, c3, c9 = doc["connections"]
    assert (c2["id"], c2["client"], c2["mptcp"], c2["paths"]) == (2, "127.0.0.1:6000", False,
                                                                   [])
    assert c3["client"] == "127.0.0.1:5001" and c3["upstream"] == "10.0.1.2:4444"
    assert (c3["listener"], c3["state"], c3["mptcp"], c3["subflows"]) == (
        "5555", "relaying", True, 1)
    assert (c3["bytes_client_to_upstream"], c3["bytes_upstream_to_client"]) == (1_000_000, 1500)
    assert c3["paths"] == [
        {"id": 1, "local": "10.0.1.1:40001", "remote": "10.0.1.2:4444", "bytes_sent": 600_000,
         "bytes_received": 1000, "bytes_retrans": 3000, "bytes_acked": 597_000,
         "rtt_us": 20000, "closed": False, "share": 60},
        {"id": 2, "local": "10.0.2.1:40002", "remote": "10.0.2.2:4444", "bytes_sent": 400_000,
         "bytes_received": 500, "bytes_retrans": 0, "bytes_acked": 400_000,
         "rtt_us": 20000, "closed": True, "share": 40}]
    assert c3["mptcp_bytes_sent"] == 1_000_000
    assert c9 == {**c9, "state": "connecting", "client": "192.0.2.7:999",
                  "via": "127.0.0.1:5000", "upstream": "example.net:80", "age_s": None}
    assert doc["locals"] == [
        {"address": "10.0.1.1", "paths": 1, "bytes_sent": 600_000, "bytes_received": 1000,
         "bytes_retrans": 3000, "bytes_acked": 597_000, "share": 60},
        {"address": "10.0.2.1", "paths": 1, "bytes_sent": 400_000, "bytes_received": 500,
         "bytes_retrans": 0, "bytes_acked": 400_000, "share": 40}]


def test_a_pair_the_relay_is_still_connecting_is_listed_as_connecting() -> None:
    pending = stat(6, (), client=("127.0.0.1", 7000), is_mptcp=False, age=0.5)._replace(
        connecting=True)
    (row,) = live.document(fake_proxy([pending]))["connections"]
    assert row == {**row, "id": 6, "state": "connecting", "client": "127.0.0.1:7000",
                   "upstream": "10.0.1.2:4444", "age_s": 0.5, "mptcp": None,
                   "bytes_client_to_upstream": None}


def test_bytes_of_closed_subflows_have_no_addresses() -> None:
    missed = PathStat(0, ("", 0), ("", 0), 50_000, 0, 0, 0, True, 50_000)
    doc = live.document(fake_proxy([stat(4, (*TWO_PATHS, missed))]))
    assert doc["connections"][0]["paths"][2] == {
        "id": 0, "local": None, "remote": None, "bytes_sent": 50_000, "bytes_received": 0,
        "bytes_retrans": 0, "bytes_acked": 50_000, "rtt_us": 0, "closed": True, "share": 5}
    assert [x["address"] for x in doc["locals"]] == ["10.0.1.1", "10.0.2.1", None]
    lines = table(doc).splitlines()
    assert lines[4].split()[:4] == ["closed", "subflows", "5%", "sent"]
    assert lines[-1].split()[:5] == ["closed", "subflows", "1", "5%", "50.0"]


def test_shares_follow_the_received_bytes_when_none_were_sent() -> None:
    doc = live.document(fake_proxy([stat(5, (
        path(1, "10.0.1.1", "10.0.1.2", 0, 300), path(2, "10.0.2.1", "10.0.2.2", 0, 100)))]))
    assert [p["share"] for p in doc["connections"][0]["paths"]] == [75, 25]
    assert [x["share"] for x in doc["locals"]] == [75, 25]
    assert live.document(fake_proxy([stat(5, ())]))["locals"] == []


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_connections_json_and_the_page_are_served(loop_name: str) -> None:
    doc = live.document(fake_proxy([stat(3, TWO_PATHS)]))

    async def body(port: int) -> object:
        return [await in_thread(fetch, port, p) for p in ("/connections", "/", "/nothing")]

    (js, jh, jb), (ps, ph, pb), (ns, _, nb) = with_server(
        loop_name, Metrics(), body, connections=lambda: doc)
    assert (js, jh["Content-Type"], jh["Cache-Control"]) == (200, "application/json",
                                                             "no-store")
    assert json.loads(jb) == doc
    assert (ps, ph["Content-Type"], pb) == (200, "text/html; charset=utf-8", statuspage.PAGE)
    assert "script-src 'sha256-" in ph["Content-Security-Policy"]
    # self-contained: nothing loaded from anywhere but the page and /connections
    assert b"http" not in pb and b"src=" not in pb and b"<link" not in pb
    assert ns == 404 and b"/connections" in nb


def test_table_shows_each_connection_its_paths_and_the_locals() -> None:
    doc = live.document(fake_proxy([stat(3, TWO_PATHS, bytes_ab=1_000_000, bytes_ba=1500,
                                         client=("127.0.0.1", 5001))]))
    lines = table(doc).splitlines()
    assert lines[0].split() == ["Conn", "Listener", "State", "Age", "Client", "Upstream",
                                "Client>Up", "Up>Client", "MPTCP"]
    assert lines[1].split() == ["3", "5555", "relaying", "1.5s", "127.0.0.1:5001",
                                "10.0.1.2:4444", "1.0", "MB", "1.5", "kB", "yes,", "1",
                                "subflow"]
    assert lines[2].split() == ["10.0.1.1:40001", ">", "10.0.1.2:4444",
                                "60%", "sent", "600.0", "kB", "acked", "597.0", "kB",
                                "received", "1.0", "kB", "retrans", "3.0", "kB", "rtt", "20.0ms"]
    assert lines[3].split()[:4] == ["10.0.2.1:40002", ">", "10.0.2.2:4444", "40%"]
    assert lines[3].split()[-1] == "closed"
    assert lines[5].split() == ["Local", "address", "Paths", "Share", "Sent", "Received",
                                "Retransmitted"]
    assert lines[6].split() == ["10.0.1.1", "1", "60%", "600.0", "kB", "1.0", "kB", "3.0",
                                "kB"]
    assert table({"connections": [], "locals": []}) == "no open connections\n"


def test_table_escapes_control_characters() -> None:
    doc = {"connections": [{"id": 1, "listener": "web\x1b[2J", "state": "relaying",
                            "client": "a\nb", "paths": []}]}
    text = table(doc)
    assert "\x1b" not in text and "web\\x1b[2J" in text and "a\\nb" in text


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "mptcpproxy", *args], capture_output=True,
                          text=True, timeout=TIMEOUT, env=env, stdin=subprocess.DEVNULL)


def test_connections_option_prints_the_table_and_the_json() -> None:
    doc = live.document(fake_proxy([stat(3, TWO_PATHS, client=("127.0.0.1", 5001))]))

    async def body(port: int) -> object:
        return [await in_thread(_cli, "--connections", f"127.0.0.1:{port}", *extra)
                for extra in ((), ("--json",))]

    shown, raw = with_server("uvloop", Metrics(), body, connections=lambda: doc)
    assert shown.returncode == 0 and shown.stderr == ""
    assert shown.stdout == table(doc)
    assert raw.returncode == 0 and json.loads(raw.stdout) == doc


def test_a_real_proxy_lists_its_open_connection() -> None:
    """End to end, on loopback: an open MPTCP connection through a server proxy is in its
    /connections (relay, control plane and HTTP server wired together) and in the table."""
    upstream = echo_server()
    port, mport = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mptcpproxy", "-m", "server", "-p", str(port), "-b", "127.0.0.1",
         "-r", f"127.0.0.1:{upstream.getsockname()[1]}", "--metrics", f"127.0.0.1:{mport}"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _cli("--connections", f"127.0.0.1:{mport}").returncode == 0,
                 "the proxy's metrics server")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262) as c:  # MPTCP
            c.settimeout(TIMEOUT)
            c.connect(("127.0.0.1", port))
            client = f"127.0.0.1:{c.getsockname()[1]}"
            c.sendall(b"x" * 5000)
            got = b""
            while len(got) < 5000:
                got += c.recv(65536)

            def listed() -> dict | None:
                doc = json.loads(_cli("--connections", f"127.0.0.1:{mport}", "--json").stdout)
                return doc if doc["connections"] else None

            (conn,) = wait_for(listed, "the connection in /connections")["connections"]
            text = _cli("--connections", f"127.0.0.1:{mport}").stdout
        assert conn["client"] == client
        assert conn["upstream"] == f"127.0.0.1:{upstream.getsockname()[1]}"
        assert (conn["listener"], conn["state"], conn["mptcp"]) == (str(port), "relaying", True)
        assert conn["bytes_client_to_upstream"] == conn["bytes_upstream_to_client"] == 5000
        assert text.splitlines()[1].split()[:3] == [str(conn["id"]), str(port), "relaying"]
        assert "yes, 1 subflow" in text
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=TIMEOUT)
        upstream.close()
    assert proc.returncode == 0, err


@pytest.mark.parametrize("remote", ["localhost", "127.0.0.1"], ids=["control-plane", "fast-path"])
def test_a_real_proxy_lists_a_client_still_connecting_upstream(remote: str) -> None:
    """A client whose upstream connection is still being made (the upstream's accept queue
    is full: its SYNs go unanswered) is listed as connecting: by the control plane for a
    name, by the relay's workers for an address (their fast path)."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)  # one connection fills the queue; SYNs after it are dropped
        taken = socket.create_connection(full.getsockname(), timeout=TIMEOUT)
        up_port, port, mport = full.getsockname()[1], free_port(), free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "mptcpproxy", "-m", "server", "-p", str(port), "-b",
             "127.0.0.1", "-r", f"{remote}:{up_port}", "--metrics",
             f"127.0.0.1:{mport}", "--drain-timeout", "1"],
            env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: _cli("--connections", f"127.0.0.1:{mport}").returncode == 0,
                     "the proxy's metrics server")
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262) as c:
                c.settimeout(TIMEOUT)
                c.connect(("127.0.0.1", port))
                client = f"127.0.0.1:{c.getsockname()[1]}"

                def listed() -> list | None:
                    doc = json.loads(_cli("--connections", f"127.0.0.1:{mport}", "--json").stdout)
                    return doc["connections"] or None

                (conn,) = wait_for(listed, "the connecting client in /connections")
                text = _cli("--connections", f"127.0.0.1:{mport}").stdout
        finally:
            proc.terminate()
            out, err = proc.communicate(timeout=TIMEOUT)
            taken.close()
    assert proc.returncode == 0, err
    assert conn == {**conn, "state": "connecting", "client": client, "listener": str(port),
                    "upstream": f"{remote}:{up_port}", "mptcp": None, "paths": []}
    assert text.splitlines()[1].split()[2] == "connecting"


def test_connections_option_when_nothing_answers() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: refused
        port = s.getsockname()[1]
        proc = _cli("--connections", f"127.0.0.1:{port}")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == (f"mptcp-proxy: error: cannot read http://127.0.0.1:{port}/"
                           f"connections: connection refused (is an mptcp-proxy running with "
                           f"--metrics 127.0.0.1:{port}?)\n")


def test_connections_option_on_a_server_without_the_view() -> None:
    async def body(port: int) -> object:
        return await in_thread(_cli, "--connections", f"127.0.0.1:{port}")

    proc = with_server("asyncio", Metrics(), body)  # a metrics server without the live view
    assert proc.returncode == 1
    assert "answered 404" in proc.stderr and "Traceback" not in proc.stderr


def test_connections_option_on_a_port_that_speaks_no_http() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        srv.settimeout(TIMEOUT)
        port = srv.getsockname()[1]
        proc = subprocess.Popen(
            [sys.executable, "-m", "mptcpproxy", "--connections", f"127.0.0.1:{port}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.DEVNULL)
        with proc:
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                conn.recv(4096)
                conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
            out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 1 and out == ""
    assert err == (f"mptcp-proxy: error: http://127.0.0.1:{port}/connections did not answer "
                   f"in HTTP: is 127.0.0.1:{port} an mptcp-proxy --metrics address?\n")


def test_connections_option_on_a_document_it_cannot_show() -> None:
    strange = {"connections": [{"id": 1, "age_s": "soon", "paths": 3}]}

    async def body(port: int) -> object:
        return [await in_thread(_cli, "--connections", f"127.0.0.1:{port}", *extra)
                for extra in ((), ("--json",))]

    shown, raw = with_server("asyncio", Metrics(), body, connections=lambda: strange)
    assert shown.returncode == 1 and shown.stdout == ""
    assert shown.stderr.startswith("mptcp-proxy: error: ") and "--json prints it" in shown.stderr
    assert len(shown.stderr.splitlines()) == 1
    assert raw.returncode == 0 and json.loads(raw.stdout) == strange


def test_json_alone_is_a_usage_error() -> None:
    proc = _cli("--json")
    assert proc.returncode == 2
    assert "--json only applies to --connections" in proc.stderr


def test_the_page_keeps_hostile_values_as_text_in_a_real_browser() -> None:
    browser.chromium()
    hostile = stat(3, (path(1, HOSTILE, "10.0.1.2", 100),), client=(HOSTILE, 1),
                   upstream=("</script><b>x</b>", 2))
    doc = live.document(fake_proxy([hostile]))
    doc["connections"][0]["listener"] = "<i>web</i>"

    async def body(port: int) -> object:
        return await in_thread(browser.dump_dom, f"http://127.0.0.1:{port}/")

    dom = browser.parse(with_server("uvloop", Metrics(), body, connections=lambda: doc))
    (conn,) = dom.find_all("div", "conn")
    text = conn.text
    assert f"client {HOSTILE}:1" in text and "</script><b>x</b>:2" in text
    assert "listener <i>web</i>" in text
    assert HOSTILE in dom.by_id("locals").text
    assert not dom.find_all("img") and not dom.find_all("b") and not dom.find_all("i")
    assert dom.find_all("title")[0].text == "mptcp-proxy: live connections"


def test_connections_with_proxy_options_is_a_usage_error() -> None:
    # `--connections` is a command of its own: a listener's options beside it were ignored
    # (the proxy was not started, the user was not told)
    proc = _cli("--connections", "127.0.0.1:9", "-m", "client", "-p", "5555", "-q")
    assert proc.returncode == 2, proc
    assert "-m/--mode, -p/--port, -q/--quiet" in proc.stderr
    assert "--connections only takes --json" in proc.stderr


def test_connections_with_an_option_at_its_default_value_is_a_usage_error() -> None:
    # an option given with its default value (--stop-grace 0, --no-splice, --log-format text)
    # is still given: it was ignored silently, the proxy not started
    proc = _cli("--connections", "127.0.0.1:9", "--stop-grace", "0", "--no-splice")
    assert proc.returncode == 2, proc
    assert "--splice/--no-splice, --stop-grace: --connections only takes --json" in proc.stderr
