"""`mptcp-proxy --check`: the diagnosis on given states, then the real thing in namespaces."""

from __future__ import annotations

import errno
import io
import os
import sys

import pytest
from netns import Host, TestBed

from mptcpproxy import check
from mptcpproxy.check import Endpoint, KernelState, diagnose, format_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ep(address: str, *flags: str, id: int = 1, dev: str | None = "eth1") -> Endpoint:
    return Endpoint(address, id, frozenset(flags), dev)


def state(**kw: object) -> KernelState:
    base = dict(enabled=1, socket_errno=0, path_manager="kernel", subflows=2,
                add_addr_accepted=2, endpoints=(), local_addresses=frozenset({"10.0.0.1"}))
    base.update(kw)
    return KernelState(**base)


def blocking(findings: list[check.Finding]) -> list[str]:
    return [f.text for f in findings if f.blocking]


def all_fixes(findings: list[check.Finding]) -> list[str]:
    return [fix for f in findings for fix in f.fixes]


# -- parsing what iproute2 6.1 prints ---------------------------------------------------------

def test_parse_limits_text_and_json() -> None:
    # iproute2 6.1 prints text for `ip -j mptcp limits show`; newer ones may print JSON
    assert check.parse_limits("add_addr_accepted 3 subflows 4 \n") == {
        "add_addr_accepted": 3, "subflows": 4}
    assert check.parse_limits('{"add_addr_accepted":1,"subflows":2}') == {
        "add_addr_accepted": 1, "subflows": 2}


def test_parse_endpoints() -> None:
    text = ('[{"address":"10.9.0.1","id":1,"signal":true,"dev":"v0"},'
            '{"address":"10.9.0.2","port":1234,"id":7,"subflow":true,"backup":true}]')
    first, second = check.parse_endpoints(text)
    assert first == Endpoint("10.9.0.1", 1, frozenset({"signal"}), "v0", None)
    assert second.flags == {"subflow", "backup"} and second.port == 1234
    assert str(second) == "10.9.0.2 port 1234 id 7 backup subflow"
    assert check.parse_endpoints("[]") == ()


def test_parse_addresses_normalises() -> None:
    text = ('[{"ifname":"lo","addr_info":[{"local":"127.0.0.1"},{"local":"::1"}]},'
            '{"ifname":"eth0","addr_info":[{"local":"FD00:0::1"}]},{"ifname":"x"}]')
    assert check.parse_addresses(text) == {"127.0.0.1", "::1", "fd00::1"}


# -- the diagnosis ------------------------------------------------------------------------------

def test_disabled_says_so_and_how_to_enable() -> None:
    findings = diagnose(state(enabled=0, socket_errno=errno.ENOPROTOOPT))
    assert "disabled" in blocking(findings)[0]
    assert "sysctl -w net.mptcp.enabled=1" in blocking(findings)[0]
    # enabled=0 alone (the socket was not tried) says the same
    assert blocking(diagnose(state(enabled=0))) == blocking(findings)


@pytest.mark.parametrize("err, words", [
    (errno.EPROTONOSUPPORT, "CONFIG_MPTCP"),
    (errno.EINVAL, "Linux 5.6 or newer"),
])
def test_no_mptcp_in_kernel(err: int, words: str) -> None:
    findings = diagnose(state(enabled=None, socket_errno=err))
    assert words in blocking(findings)[0]


def test_limits_zero_blocks_both_roles() -> None:
    for mode in ("client", "server", None):
        findings = diagnose(state(subflows=0, endpoints=(ep("10.0.0.1", "signal", "subflow"),)),
                            mode)
        assert any("subflows limit is 0" in t for t in blocking(findings))
        assert any(f.startswith("ip mptcp limits set subflows 2") for f in all_fixes(findings))


def test_client_without_endpoints_or_accepted_addresses() -> None:
    findings = diagnose(state(add_addr_accepted=0), "client")
    assert blocking(findings) and "opens no extra subflow" in blocking(findings)[0]
    assert "ip mptcp limits set subflows 2 add_addr_accepted 2" in all_fixes(findings)
    assert "ip mptcp endpoint add ADDR dev DEV subflow" in all_fixes(findings)


def test_client_good_either_way() -> None:
    assert not blocking(diagnose(state(add_addr_accepted=1), "client"))
    sub = state(add_addr_accepted=0, endpoints=(ep("10.0.0.1", "subflow"),))
    findings = diagnose(sub, "client")
    assert not blocking(findings)
    assert any("ignores the addresses the server announces" in f.text for f in findings)


def test_server_without_signal_endpoint_is_a_note() -> None:
    findings = diagnose(state(), "server")
    assert not blocking(findings)
    assert "announces no address" in findings[0].text
    assert not diagnose(state(endpoints=(ep("10.0.0.1", "signal"),)), "server")


def test_both_roles_need_the_client_side() -> None:
    assert blocking(diagnose(state(add_addr_accepted=0)))
    assert not blocking(diagnose(state(endpoints=(ep("10.0.0.1", "signal", "subflow"),))))


def test_endpoint_without_flags_and_foreign_address() -> None:
    findings = diagnose(state(add_addr_accepted=0, endpoints=(
        ep("10.0.0.1", "backup", id=3), ep("192.0.2.9", "subflow", id=4))), "client")
    texts = " | ".join(f.text for f in findings)
    assert "neither the signal nor the subflow flag" in texts
    assert "not an address of this host" in texts
    assert ("ip mptcp endpoint delete id 3 && ip mptcp endpoint add 10.0.0.1 dev eth1 subflow"
            in all_fixes(findings))
    # the foreign subflow endpoint cannot open a subflow: nothing left to open one
    assert blocking(findings)


def test_userspace_path_manager_is_not_judged() -> None:
    findings = diagnose(state(path_manager="userspace", subflows=0), "client")
    assert not blocking(findings)
    assert "userspace daemon" in findings[0].text


def test_unreadable_limits_block() -> None:
    findings = diagnose(state(subflows=None, endpoints=None, ip_error="'ip' not found"))
    assert "cannot read the MPTCP limits" in blocking(findings)[0]


def test_report_words() -> None:
    st = state(add_addr_accepted=0, endpoints=(ep("10.0.0.1", "signal"),))
    text = format_report(st, diagnose(st, "client"), "client")
    assert "limits:        subflows 2, add_addr_accepted 0" in text
    assert "10.0.0.1 id 1 signal dev eth1" in text
    assert "Problems:" in text and text.endswith("one path.\n")


def test_run_check_here_writes_a_report() -> None:
    out = io.StringIO()
    rc = check.run_check("server", out)
    assert rc in (0, 1)
    assert out.getvalue().startswith("MPTCP check for this network namespace (as a server)")


# -- in network namespaces ------------------------------------------------------------------------

@pytest.fixture
def host():
    with TestBed("check") as bed:
        cli, peer = bed.host("cli"), bed.host("peer")
        bed.link(cli, peer, "10.123.230.1/24", "10.123.230.2/24")
        bed.link(cli, peer, "10.123.231.1/24", "10.123.231.2/24")
        yield cli


def run_check(host: Host, *args: str) -> tuple[int, str]:
    env = ["env", f"PYTHONPATH={REPO}"]
    res = host.run([*env, sys.executable, "-m", "mptcpproxy.check", *args], check=False)
    assert not res.stderr, res.stderr
    return res.returncode, res.stdout


# (limits (subflows, add_addr_accepted), endpoint flags or None, -m) -> exit code, words
NS_CASES = {
    "limits-zero-client": ((0, 0), "subflow", "client", 1, "subflows limit is 0"),
    "limits-zero-server": ((0, 0), "signal", "server", 1, "ip mptcp limits set subflows 2"),
    "client-no-endpoints": ((2, 0), None, "client", 1, "opens no extra subflow"),
    "client-flagless-endpoint": ((2, 0), "backup", "client", 1, "neither the signal nor the"),
    "client-good": ((2, 2), "subflow", "client", 0, "10.123.231.1 id 1 subflow dev eth1"),
    "server-good": ((2, 0), "signal", "server", 0, "10.123.231.1 id 1 signal dev eth1"),
    "both-good": ((2, 2), "signal", None, 0, "as client and as server"),
}


@pytest.mark.privileged
class TestInNamespace:
    """`python -m mptcpproxy.check` run in a namespace (two veth links to a peer)."""

    @pytest.mark.parametrize("mode", ["client", "server"])
    def test_disabled(self, host: Host, mode: str) -> None:
        host.sysctl("net.mptcp.enabled", 0)
        rc, out = run_check(host, "-m", mode)
        assert rc == 1, out
        assert "MPTCP is disabled" in out and "sysctl -w net.mptcp.enabled=1" in out
        assert out.endswith("NOT possible: MPTCP connections use one path.\n")

    @pytest.mark.parametrize("limits, flags, mode, code, words", NS_CASES.values(),
                             ids=NS_CASES.keys())
    def test_settings(self, host: Host, limits: tuple[int, int], flags: str | None,
                      mode: str | None, code: int, words: str) -> None:
        host.mptcp_limits(subflows=limits[0], add_addr_accepted=limits[1])
        if flags:
            host.mptcp_endpoint("10.123.231.1", "eth1", flags)
        rc, out = run_check(host, *(["-m", mode] if mode else []))
        assert rc == code, out
        assert words in out
        assert out.endswith("extra subflows are possible.\n" if code == 0 else "one path.\n")
