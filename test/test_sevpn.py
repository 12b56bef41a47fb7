"""The sevpn scenario: a VPN whose transport is TCP (SoftEther) runs through the proxies.

::

    cli: vpnclient (vpn_se0 10.123.210.2) -TCP-> client proxy :5555
                 ||  MPTCP: path 1 10.123.200.0/24 (first subflow),
                 ||         path 2 10.123.201.0/24 (announced by srv): the simple scenario
    srv: server proxy :4444 -TCP-> vpnserver :443, its hub bridged to eth2
    lan: 10.123.210.1 on the other end of eth2

A ping from the client host to the lan host crosses the VPN; with MPTCP it survives the
loss of the path the connections started on, with plain TCP it does not.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from netns import MptcpMonitor, TestBed
from softether import VpnClient, VpnServer, available
from test_scenarios import CLIENT_PORT, SERVER_PORT, Topo, simple, start_proxy

_MISSING = available()
pytestmark = [
    pytest.mark.privileged,
    pytest.mark.timeout(90),
    pytest.mark.skipif(_MISSING is not None, reason=str(_MISSING)),
]

VPN_SERVER_PORT = 443  # one of vpnserver's listeners
LAN_ADDR, VPN_ADDR = "10.123.210.1", "10.123.210.2/24"
HUB, USER, PASSWORD = "VPN", "alice", "sevpn-test"


@dataclass
class Sevpn:
    """One sevpn test bed with the VPN session established."""

    topo: Topo  # topo.paths[0] carries the first subflow (the initial path)
    monitor: MptcpMonitor  # ip mptcp monitor in the client host
    vpnserver: VpnServer
    vpnclient: VpnClient

    def ping(self, count: int, interval: float = 0.2, wait: float = 2.0) -> int:
        """Ping the lan host across the VPN; return how many replies arrived (late ones
        too: ping waits ``wait`` seconds after the last request)."""
        res = self.topo.cli.run(["ping", "-n", "-c", str(count), "-i", str(interval),
                                 "-W", str(wait), LAN_ADDR],
                                check=False, timeout=count * interval + wait + 10)
        m = re.search(r"(\d+) received", res.stdout)
        assert m, f"no ping statistics:\n{res.stdout}\n{res.stderr}"
        return int(m.group(1))


@pytest.fixture
def sevpn(testbed: TestBed) -> Iterator[Callable[[bool], Sevpn]]:
    """Build the scenario with MPTCP (``True``) or ``--disable-mptcp`` proxies (``False``)."""
    daemons: list[VpnServer | VpnClient] = []

    def build(mptcp: bool) -> Sevpn:
        topo = simple(testbed)
        cli, srv = topo.cli, topo.srv
        # srv's end has no address: vpnserver bridges it to the hub
        bridge = testbed.link(srv, testbed.host("lan"), None, f"{LAN_ADDR}/24")
        # the daemons boot while the proxies start; each is waited for when first used
        daemons.extend((VpnServer(srv), VpnClient(cli)))
        vpnserver, vpnclient = daemons
        # a stalled connection (plain TCP, path cut) must not hold the proxies' drain at stop
        extra = ("--drain-timeout", "0.5", *(() if mptcp else ("--disable-mptcp",)))
        start_proxy(srv, "server", SERVER_PORT, f"127.0.0.1:{VPN_SERVER_PORT}", *extra)
        start_proxy(cli, "client", CLIENT_PORT, f"{topo.server_addr}:{SERVER_PORT}", *extra)
        monitor = cli.monitor()
        with ThreadPoolExecutor(1) as pool:
            hub = pool.submit(vpnserver.add_hub, HUB, USER, PASSWORD, bridge.dev_a)
            nic = vpnclient.add_account(f"127.0.0.1:{CLIENT_PORT}", HUB, USER, PASSWORD)
            hub.result()
        vpnclient.connect()
        cli.ip("addr", "add", VPN_ADDR, "dev", nic)
        cli.ip("link", "set", nic, "up")
        return Sevpn(topo, monitor, vpnserver, vpnclient)

    try:
        yield build
    finally:
        for daemon in daemons:  # before the bed goes: logs (shown on failure), fast stop
            print(daemon.log())
            daemon.stop()


def test_sevpn_ping(sevpn: Callable[[bool], Sevpn]) -> None:
    env = sevpn(True)
    assert env.ping(5) == 5
    # one VPN session opens two TCP connections: each event at least once
    env.monitor.wait_for({"CREATED": 1, "ESTABLISHED": 1, "ANNOUNCED": 1, "SF_ESTABLISHED": 1})


def test_sevpn_failover_initial_path(sevpn: Callable[[bool], Sevpn]) -> None:
    env = sevpn(True)
    env.monitor.wait_for({"SF_ESTABLISHED": 1})  # the second path is in use before the cut
    assert env.ping(3) == 3
    env.topo.paths[0].down()
    received = env.ping(10, interval=0.3)
    assert received >= 7, f"{received}/10 replies after the initial path went down"
    # the same VPN session carried them: it never had to reconnect
    status = env.vpnclient.status()
    assert status["Number of Established Sessions"] == "1 Times", status


def test_sevpn_no_failover_without_mptcp(sevpn: Callable[[bool], Sevpn]) -> None:
    """Negative control: plain TCP between the proxies is tied to the path that goes down."""
    env = sevpn(False)
    assert env.ping(3) == 3
    env.topo.paths[0].down()
    received = env.ping(5, interval=0.3, wait=1.0)  # bounded: about 2.5 s
    assert received == 0, f"{received}/5 replies with plain TCP after its path went down"
    assert env.monitor.counts()["CREATED"] == 0, "\n".join(env.monitor.lines)
