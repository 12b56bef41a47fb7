"""The live view during a real two-path transfer (namespaces): the client proxy's
`/connections` and `mptcp-proxy --connections` show the proxied connection with its two
subflows, and the status page, loaded in headless Chromium, shows both paths."""

from __future__ import annotations

import json
import sys

import browser
import pytest
from netns import Host, TestBed, wait_until
from test_scenarios import CLIENT_PORT, PROXY_ENV, SERVER_PORT, SERVICE_PORT, XFER, simple

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(120)]

METRICS = "127.0.0.1:9541"  # inside the client's namespace
SIZE = 64 << 20  # about 13 s on two 20 Mbit/s paths: still running while the test looks
PATH_ADDRS = ("10.123.200.1", "10.123.201.1")  # the client's end of each path


def _proxy(host: Host, mode: str, port: int, remote: str, *extra: str) -> None:
    # the transfer is cut short at the end of the test: no drain to wait for
    proc = host.start([sys.executable, "-m", "mptcpproxy", "-m", mode, "-p", str(port),
                       "-r", remote, "--drain-timeout", "1", *extra], name=f"proxy-{mode}",
                      env=PROXY_ENV)
    host.wait_listening(port, proc=proc)


def connections(host: Host, *args: str) -> str:
    res = host.run([sys.executable, "-m", "mptcpproxy", "--connections", METRICS, *args],
                   timeout=15, check=False)
    assert res.returncode == 0, res.stderr
    return res.stdout


def _both_paths_busy(host: Host) -> dict | None:
    for conn in json.loads(connections(host, "--json"))["connections"]:
        busy = [p for p in conn["paths"] if p["bytes_sent"] > 0 and not p["closed"]]
        if len(busy) >= 2:
            return conn
    return None


def two_path_transfer(bed: TestBed) -> tuple[Host, dict]:
    """A transfer through the proxies on two shaped paths, both carrying data; returns the
    client host and the client proxy's /connections entry for it."""
    topo = simple(bed)
    for link in topo.paths:
        link.shape("20mbit", "32kb", "20ms")
    receiver = topo.srv.start([sys.executable, XFER, "recv", str(SERVICE_PORT)], name="recv")
    topo.srv.wait_listening(SERVICE_PORT, proc=receiver)
    _proxy(topo.srv, "server", SERVER_PORT, f"localhost:{SERVICE_PORT}")
    _proxy(topo.cli, "client", CLIENT_PORT, f"{topo.server_addr}:{SERVER_PORT}",
           "--metrics", METRICS)
    sender = topo.cli.start([sys.executable, XFER, "send", "127.0.0.1", str(CLIENT_PORT),
                             str(SIZE)], name="send")
    conn = wait_until(lambda: sender.poll() is None and _both_paths_busy(topo.cli), 20,
                      "both paths to carry the transfer in /connections")
    assert sender.poll() is None, f"the transfer ended early\n{bed.describe()}"
    return topo.cli, conn


def test_connections_shows_the_two_subflows_of_a_live_transfer(testbed: TestBed) -> None:
    cli, conn = two_path_transfer(testbed)
    print(json.dumps(conn, indent=2))
    assert (conn["state"], conn["mptcp"], conn["subflows"]) == ("relaying", True, 2)
    assert conn["client"].startswith("127.0.0.1:")
    assert conn["upstream"] == f"10.123.200.2:{SERVER_PORT}"
    assert sorted(p["local"].rsplit(":", 1)[0] for p in conn["paths"]) == list(PATH_ADDRS)
    assert sorted(p["remote"] for p in conn["paths"]) == [
        f"10.123.200.2:{SERVER_PORT}", f"10.123.201.2:{SERVER_PORT}"]
    assert all(p["rtt_us"] > 0 for p in conn["paths"])
    assert conn["bytes_client_to_upstream"] > 0
    assert 99 <= sum(p["share"] for p in conn["paths"]) <= 101

    text = connections(cli)
    print(text)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["Conn", "Listener", "State"]
    (row,) = [i for i, line in enumerate(lines) if line.startswith(f"{conn['id']} ")]
    assert lines[row].split()[1:3] == [str(CLIENT_PORT), "relaying"]
    assert lines[row].endswith("yes, 2 subflows")
    paths = [line.split() for line in lines[row + 1:row + 3]]
    assert sorted(p[0].rsplit(":", 1)[0] for p in paths) == list(PATH_ADDRS)
    assert all(p[1] == ">" and p[3].endswith("%") and p[4] == "sent" for p in paths)
    totals = lines[lines.index("") + 1:]
    assert totals[0].split()[:2] == ["Local", "address"]
    assert [t.split()[0] for t in totals[1:]] == list(PATH_ADDRS)


def test_status_page_shows_both_paths_in_a_browser(testbed: TestBed) -> None:
    browser.chromium()
    cli, conn = two_path_transfer(testbed)
    dom = browser.parse(browser.dump_dom(f"http://{METRICS}/", 2500, wrap=cli.argv([])))
    shown = {c.attrs.get("data-id"): c for c in dom.find_all("div", "conn")}
    assert str(conn["id"]) in shown, dom.text
    box = shown[str(conn["id"])]
    assert "MPTCP yes, 2 subflows" in box.text
    routes = sorted(li.find_all("span", "route")[0].text for li in box.find_all("li", "path"))
    assert [r.split(":", 1)[0] for r in routes] == list(PATH_ADDRS), routes
    assert len(box.find_all("span", "seg")) == 2  # the bar, split by path
    addresses = [td.text for td in dom.by_id("locals").find_all("td", "address")]
    assert addresses == list(PATH_ADDRS)
    assert dom.by_id("status").text.startswith("1 open connection")
