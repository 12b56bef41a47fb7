"""`mptcp-proxy --check`: the diagnosis on given states, then the real thing in namespaces."""

from __future__ import annotations

import errno
import io
import os
import sys
from dataclasses import replace

import pytest
from netns import Host, TestBed

from mptcpproxy import check, kernelstate
from mptcpproxy.check import Endpoint, KernelState, diagnose, format_report
from mptcpproxy.config import Config, HostPort

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


# -- where joins can arrive at a server: the C flag and a bound listener (-b) ------------------

SECOND = ep("10.0.1.2", "signal", dev="eth1")
TWO_ADDRESSES = frozenset({"10.0.0.2", "10.0.1.2"})


def test_read_state_reads_the_c_flag(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "enabled").write_text("1\n")
    (tmp_path / "allow_join_initial_addr_port").write_text("0\n")
    monkeypatch.setattr(kernelstate, "SYSCTL_DIR", tmp_path)
    assert check.read_state().allow_join_initial_addr_port == 0
    (tmp_path / "allow_join_initial_addr_port").unlink()  # a kernel before 5.17
    assert check.read_state().allow_join_initial_addr_port is None


@pytest.mark.parametrize("mode", ["server", None])
def test_c_flag_without_signal_endpoint_blocks(mode: str | None) -> None:
    findings = diagnose(state(allow_join_initial_addr_port=0), mode)
    text = blocking(findings)[-1]
    assert "net.mptcp.allow_join_initial_addr_port is 0" in text
    assert "may not join the address they connected to" in text
    assert all_fixes(findings)[-2:] == [
        "sysctl -w net.mptcp.allow_join_initial_addr_port=1",
        "ip mptcp endpoint add ADDR2 dev DEV2 signal"]


def test_c_flag_with_signal_endpoint_is_fine() -> None:
    # the load-balancer set-up: clients join only the backend's own announced address
    st = state(allow_join_initial_addr_port=0, endpoints=(SECOND,),
               local_addresses=TWO_ADDRESSES)
    assert diagnose(st, "server") == []
    assert not blocking(diagnose(state(allow_join_initial_addr_port=0), "client"))


def test_c_flag_in_the_report() -> None:
    st = state(allow_join_initial_addr_port=0)
    text = format_report(st, diagnose(st, "server"), "server")
    assert ("  joins:         net.mptcp.allow_join_initial_addr_port = 0: clients may NOT "
            "(the C flag) join the address they connected to\n") in text
    assert "= 1: clients may join" in format_report(
        state(allow_join_initial_addr_port=1), [], "server")
    assert "joins:" not in format_report(state(), [], "server")  # not known: not shown


def test_bound_server_misses_joins_to_other_announced_addresses() -> None:
    st = state(endpoints=(SECOND,), local_addresses=TWO_ADDRESSES)
    assert diagnose(st, "server") == []  # on every address: the join finds the listener
    findings = diagnose(st, "server", bind="10.0.0.2")
    assert not blocking(findings)  # the client's own subflow endpoints may still join
    assert findings[0].warn
    assert "listens on 10.0.0.2 only (-b)" in findings[0].text
    assert "joins to the announced address 10.0.1.2 are reset" in findings[0].text
    assert findings[0].fixes[0].startswith("leave out -b")
    assert "firewall" in findings[0].fixes[0]
    # or keep -b: an endpoint with a port of its own gets a listener of the kernel's
    assert findings[0].fixes[1].startswith(
        "ip mptcp endpoint delete id 1 && ip mptcp endpoint add 10.0.1.2 dev eth1 port PORT "
        "signal   (with a port, the kernel itself listens there for joins)")
    text = format_report(st, findings, "server", "10.0.0.2")
    assert "  listener:      10.0.0.2 only (-b)\n" in text
    assert "    fix: leave out -b" in text


def test_bound_server_with_c_flag_blocks() -> None:
    st = state(endpoints=(SECOND,), local_addresses=TWO_ADDRESSES,
               allow_join_initial_addr_port=0)
    findings = diagnose(st, "server", bind="10.0.0.2")
    assert "may not join 10.0.0.2 either" in blocking(findings)[0]
    assert all_fixes(findings)[-1] == "sysctl -w net.mptcp.allow_join_initial_addr_port=1"
    # no signal endpoint at all: with -b, only one with a port of its own would do
    findings = diagnose(state(allow_join_initial_addr_port=0), "server", bind="10.0.0.2")
    assert "announces no other address" in blocking(findings)[0]
    assert all_fixes(findings)[1].startswith("ip mptcp endpoint add ADDR2 dev DEV2 port PORT")


@pytest.mark.parametrize("bind, endpoint, missed", [
    ("10.0.1.2", SECOND, False),  # the bound address is the announced one
    ("0.0.0.0", SECOND, False),
    ("::", SECOND, True),  # -b :: listens on IPv6 only
    ("10.0.0.2", Endpoint("10.0.1.2", 2, frozenset({"signal"}), "eth1", 4444), False),
    ("10.0.0.2", ep("10.0.1.2", "subflow"), False),  # not announced
])
def test_which_joins_find_the_listener(bind: str, endpoint: Endpoint, missed: bool) -> None:
    # an endpoint with a port of its own has the kernel's listener there
    st = state(endpoints=(endpoint,), local_addresses=TWO_ADDRESSES)
    texts = [f.text for f in diagnose(st, "server", bind=bind)]
    assert any("only (-b)" in t for t in texts) is missed, texts


def test_startup_warnings() -> None:
    server = Config(mode="server", port=4444, remote=HostPort("127.0.0.1", 80), bind="10.0.0.2")
    st = state(endpoints=(SECOND,), local_addresses=TWO_ADDRESSES)
    (warning,) = check.startup_warnings(server, st)
    assert warning.startswith("the proxy listens on 10.0.0.2 only (-b)")
    assert "; fix: leave out -b" in warning
    c_flag = state(allow_join_initial_addr_port=0)
    unbound = replace(server, bind=None)
    assert "; fix: sysctl -w net.mptcp.allow_join_initial_addr_port=1; or: ip mptcp " \
        "endpoint add ADDR2 dev DEV2 signal" in check.startup_warnings(unbound, c_flag)[0]
    assert check.startup_warnings(unbound, state(subflows=0))[0].startswith(
        "the subflows limit is 0")
    # notes are no warnings; a client or plain TCP is not judged; unreadable says nothing
    assert check.startup_warnings(unbound, state()) == []
    assert check.startup_warnings(replace(server, mode="client"), c_flag) == []
    assert check.startup_warnings(replace(server, disable_mptcp=True), c_flag) == []
    assert check.startup_warnings(unbound, state(subflows=None, ip_error="no ip")) == []


def test_startup_warnings_never_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kw: object) -> None:
        raise RuntimeError("surprise")

    monkeypatch.setattr(check, "read_state", broken)
    assert check.startup_warnings(Config(mode="server", port=1, remote=None)) == []


def test_check_bind_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        check.main(["-m", "server", "-b", "nowhere"])
    assert exc.value.code == 2


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


# -- the kernel's join counters (/proc/net/netstat): joins refused or unanswered ---------------

def counters(**kw: int) -> dict[str, int]:
    return {"MPJoinNoTokenFound": 0, "MPJoinSynTx": 0, "MPJoinSynAckRx": 0, **kw}


def test_joins_for_unknown_connections_on_a_server() -> None:
    # a load balancer spreading joins: this server resets those meant for another one
    st = state(counters=counters(MPJoinNoTokenFound=20))
    note = next(f for f in diagnose(st, "server") if "MPJoinNoTokenFound" in f.text)
    assert not note.blocking and not note.warn
    assert "MPJoinNoTokenFound is 20: joins for unknown connections arrive here: is a load " \
        "balancer spreading subflows" in note.text and "docs/scale-out.md" in note.text
    assert note.fixes == ("ip mptcp endpoint add OWN_ADDR dev DEV signal && sysctl -w "
                          "net.mptcp.allow_join_initial_addr_port=0   (on every server behind "
                          "the load balancer: docs/scale-out.md)",)
    # half of the remedy in place: the fix names the other half only
    half = replace(st, endpoints=(SECOND,), local_addresses=TWO_ADDRESSES)
    assert all_fixes(diagnose(half, "server")) == [
        "sysctl -w net.mptcp.allow_join_initial_addr_port=0   (on every server behind the "
        "load balancer: docs/scale-out.md)"]
    done = replace(half, allow_join_initial_addr_port=0)
    assert "may predate that" in all_fixes(diagnose(done, "server"))[0]
    # a client is not told about joins it received
    assert not [f for f in diagnose(st, "client") if "MPJoinNoTokenFound" in f.text]
    assert "MPJoinNoTokenFound is" not in run_check_report(state(counters=counters()), "server")


def run_check_report(st: KernelState, mode: str | None) -> str:
    return format_report(st, diagnose(st, mode), mode)


def test_joins_sent_but_not_answered_on_a_client() -> None:
    st = state(counters=counters(MPJoinSynTx=20, MPJoinSynAckRx=2))
    findings = diagnose(st, "client")
    assert not blocking(findings)
    note = next(f for f in findings if "not answered" in f.text)
    assert note.text.startswith("18 of the 20 joins this host sent were not answered "
                                "(MPJoinSynTx 20, MPJoinSynAckRx 2)")
    assert "error=111" in note.text
    assert "sysctl -w net.mptcp.allow_join_initial_addr_port=0" in note.fixes[0]
    assert note.fixes[1].startswith("ip route add ANNOUNCED_ADDR via GATEWAY dev DEV")
    assert not [f for f in diagnose(st, "server") if "not answered" in f.text]
    # all answered, or a kernel without MPJoinSynTx: nothing to say
    assert not [f for f in diagnose(state(counters=counters(MPJoinSynTx=3, MPJoinSynAckRx=3)))
                if "not answered" in f.text]
    assert not [f for f in diagnose(state(counters={"MPJoinSynAckRx": 0})) if "answered" in f.text]


def test_join_counters_in_the_report() -> None:
    text = run_check_report(state(counters=counters(MPJoinSynTx=5, MPJoinSynAckRx=5)), None)
    assert ("  join counters: MPJoinSynTx 5, MPJoinSynAckRx 5, MPJoinNoTokenFound 0 (since the "
            "namespace was made)\n") in text
    assert text.endswith("extra subflows are possible.\n")  # notes never change the exit code
    assert "join counters" not in run_check_report(state(), None)  # not read: not shown


def test_read_state_reads_the_counters(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    netstat = tmp_path / "netstat"
    netstat.write_text("TcpExt: SyncookiesSent X\nTcpExt: 0 1\n"
                       "MPTcpExt: MPCapableSYNRX MPJoinNoTokenFound MPJoinSynTx\n"
                       "MPTcpExt: 4 7 9\n")
    monkeypatch.setattr(kernelstate, "NETSTAT", netstat)
    assert kernelstate.read_counters(netstat) == {
        "MPCapableSYNRX": 4, "MPJoinNoTokenFound": 7, "MPJoinSynTx": 9}
    assert kernelstate.read_counters(tmp_path / "missing") is None
    netstat.write_text("TcpExt: A\nTcpExt: 1\n")  # a kernel without MPTCP
    assert kernelstate.read_counters(netstat) is None


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


# -- --check --source client: what connecting from the client's address needs ---------------

def test_source_client_without_cap_net_admin_fails_the_check(monkeypatch) -> None:
    from mptcpproxy import firewall, srcaddr

    good = state(endpoints=(SECOND,), local_addresses=TWO_ADDRESSES)
    assert not diagnose(good, "server")
    monkeypatch.setattr(check, "read_state", lambda *a, **kw: good)
    monkeypatch.setattr(srcaddr, "missing_rules", lambda *a, **kw: [])
    monkeypatch.setattr(firewall, "has_cap_net_admin", lambda: False)
    out = io.StringIO()
    assert check.run_check("server", out, source="client", port=4444) == 1
    text = out.getvalue()
    problems = text.split("Problems:\n", 1)[1]
    assert problems.startswith("  - --source client needs CAP_NET_ADMIN"), text
    assert "Result: extra subflows are possible, but --source client cannot work here" in text
    monkeypatch.setattr(firewall, "has_cap_net_admin", lambda: True)
    out = io.StringIO()
    assert check.run_check("server", out, source="client", port=4444) == 0, out.getvalue()


def test_checksums_off_is_a_note_with_its_fix() -> None:
    # DSS checksums catch a kernel bug that corrupted bytes on joined subflows (Linux 6.18,
    # test/kernel_integrity.py): a note, never a problem; not said where no subflow can join
    fix = "sysctl -w net.mptcp.checksum_enabled=1"
    off = diagnose(state(checksum_enabled=0, endpoints=(ep("10.0.0.1", "signal"),)), "server")
    (note,) = [f for f in off if fix in f.fixes]
    assert not note.blocking and not note.warn
    assert "checksums are off" in note.text and "docs/operating.md" in note.text
    report = format_report(state(checksum_enabled=0), off, "server")
    assert "  checksums:     net.mptcp.checksum_enabled = 0" in report
    for quiet in (state(checksum_enabled=1), state(checksum_enabled=0, subflows=0), state()):
        assert fix not in all_fixes(diagnose(quiet, "client"))
