"""Transparent mode without root: the exact rules and argv built for given options, the
order of set-up and restore, the refusals, the CLI decisions, the original-destination
decision and the conntrack netlink messages."""

from __future__ import annotations

import errno
import socket
import struct
import subprocess
import sys

import pytest

from mptcpproxy import conntrack, firewall
from mptcpproxy.cli import build_parser, config_from_args
from mptcpproxy.config import Config, ConfigError, HostPort, parse_mark, parse_port_ranges
from mptcpproxy.firewall import FirewallError, FirewallSpec, Redirect, Step, Tproxy
from mptcpproxy.origdst import Refused, decide

M = "0x6d7015b3"  # TPROXY_BASE | 5555
T = "1836062131"  # the same number, as the routing table


def proxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mptcpproxy", *args], capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)


class Recorder:
    """A runner that records each step and fails the argv prefixes it is told to."""

    def __init__(self, fail: tuple[tuple[str, ...], ...] = ()) -> None:
        self.calls: list[Step] = []
        self.fail = fail

    def __call__(self, step: Step) -> None:
        self.calls.append(step)
        if any(step.argv[:len(f)] == f for f in self.fail):
            raise FirewallError(f"'{' '.join(step.argv)}' failed: no such thing")

    @property
    def argvs(self) -> list[list[str]]:
        return [list(step.argv) for step in self.calls]


# -- rules as text --------------------------------------------------------------------------

def test_redirect_rules_with_mark_and_uid() -> None:
    spec = FirewallSpec(port=5555, intercept=((80, 80), (443, 443), (8000, 8100)), mark=1,
                        uid=1000)
    assert Redirect(spec).nft_rules() == """\
table inet mptcpproxy_5555
delete table inet mptcpproxy_5555
table inet mptcpproxy_5555 {
\tchain prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tfib daddr type local return
\t\ttcp dport { 80, 443, 8000-8100 } redirect to :5555
\t}
\tchain output {
\t\ttype nat hook output priority -100; policy accept;
\t\tmeta mark 0x1 return
\t\tmeta skuid 1000 return
\t\ttcp option mptcp exists return
\t\tfib daddr type local return
\t\ttcp dport { 80, 443, 8000-8100 } redirect to :5555
\t}
}
"""


def test_redirect_server_mode_does_not_skip_mptcp() -> None:
    # a transparent server intercepts MPTCP: its own connections are TCP
    spec = FirewallSpec(port=4444, mode="server", intercept=((8080, 8080),), uid=1000)
    assert Redirect(spec).chains()[1][2] == [
        "meta skuid 1000 return", "fib daddr type local return",
        "tcp dport 8080 redirect to :4444",
    ]


def test_redirect_server_mode_catches_only_joins_to_this_host() -> None:
    # an MPTCP join (option subtype 1, MP_JOIN) to an announced address of this host must
    # reach the listener; any other connection to this host is its own services' business
    spec = FirewallSpec(port=4444, mode="server", intercept=((8080, 8080),))
    assert Redirect(spec).chains()[0][2] == [
        "fib daddr type local tcp option mptcp subtype 1 tcp dport 8080 redirect to :4444",
        "fib daddr type local return",
        "tcp dport 8080 redirect to :4444",
    ]


def test_redirect_all_tcp_as_root_without_mark_is_prerouting_only() -> None:
    # connections to the gateway itself (its SSH, its web UI) are delivered, not proxied
    method = Redirect(FirewallSpec(port=5555))
    assert method.chains() == [
        ("prerouting", "type nat hook prerouting priority dstnat; policy accept;",
         ["fib daddr type local return", "meta l4proto tcp redirect to :5555"]),
    ]
    assert "local applications are not intercepted" in method.notes()[0]
    assert method.setup_steps() == [Step(("nft", "-f", "-"), method.nft_rules())]
    assert method.restore_steps() == [Step(("nft", "delete", "table", "inet",
                                            "mptcpproxy_5555"))]


def test_tproxy_rules() -> None:
    spec = FirewallSpec(port=5555, intercept=((4444, 4444),), mark=7)
    assert Tproxy(spec).nft_rules() == f"""\
table inet mptcpproxy_5555
delete table inet mptcpproxy_5555
table inet mptcpproxy_5555 {{
\tchain prerouting {{
\t\ttype filter hook prerouting priority mangle; policy accept;
\t\tiifname "lo" return
\t\tfib daddr type local return
\t\ttcp dport 4444 tproxy to :5555 meta mark set {M} accept
\t}}
}}
"""


def test_tproxy_setup_and_restore_argv() -> None:
    method = Tproxy(FirewallSpec(port=5555))
    assert firewall.commands(method.setup_steps()) == [
        ["ip", "-4", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", T],
        ["ip", "-4", "rule", "add", "fwmark", M, "lookup", T],
        ["ip", "-6", "route", "add", "local", "::/0", "dev", "lo", "table", T],
        ["ip", "-6", "rule", "add", "fwmark", M, "lookup", T],
        ["nft", "-f", "-"],
    ]
    assert "meta l4proto tcp tproxy to :5555" in method.setup_steps()[-1].input
    assert firewall.commands(method.restore_steps()) == [
        ["nft", "delete", "table", "inet", "mptcpproxy_5555"],
        ["ip", "-6", "rule", "del", "fwmark", M, "lookup", T],
        ["ip", "-6", "route", "del", "local", "::/0", "dev", "lo", "table", T],
        ["ip", "-4", "rule", "del", "fwmark", M, "lookup", T],
        ["ip", "-4", "route", "del", "local", "0.0.0.0/0", "dev", "lo", "table", T],
    ]


def test_tproxy_without_ipv6() -> None:
    method = Tproxy(FirewallSpec(port=5555, ipv6=False))
    assert [argv[1] for argv in firewall.commands(method.setup_steps()[:-1])] == ["-4", "-4"]


def test_tproxy_server_note() -> None:
    assert Tproxy(FirewallSpec(port=8080, mode="server", intercept=((8080, 8080),))).notes() == []
    note = Tproxy(FirewallSpec(port=4444, mode="server", intercept=((8080, 8080),))).notes()
    assert "-p P --intercept P" in note[0]


def test_print_firewall_text() -> None:
    cfg = Config(mode="client", port=5555, remote=None, transparent="tproxy",
                 intercept=((80, 80), (443, 443)))
    method = firewall.method_for(cfg, uid=0, ipv6=False)
    assert "\t\ttcp dport { 80, 443 } tproxy to :5555" in method.nft_rules()
    assert method.manual() == f"""\
# mptcp-proxy -t tproxy, listener port 5555, intercepting TCP to port(s) 80,443.
# Install (loading the table again replaces it):
ip -4 route add local 0.0.0.0/0 dev lo table {T}
ip -4 rule add fwmark {M} lookup {T}
nft -f - <<'EOF'
{method.nft_rules()}EOF
# Remove:
nft delete table inet mptcpproxy_5555
ip -4 rule del fwmark {M} lookup {T}
ip -4 route del local 0.0.0.0/0 dev lo table {T}
"""


def test_spec_from_config() -> None:
    cfg = Config(mode="server", port=4444, remote=None, transparent="redirect", mark=9,
                 intercept=((8080, 8080),))
    assert firewall.spec_from_config(cfg, ipv6=True, uid=0) == FirewallSpec(
        port=4444, mode="server", intercept=((8080, 8080),), mark=9, uid=None, ipv6=True)
    assert firewall.spec_from_config(cfg, ipv6=False, uid=123).uid == 123


# -- set-up and restore order ---------------------------------------------------------------

def test_setup_clears_leftovers_then_installs_and_restore_undoes_exactly() -> None:
    rec = Recorder(fail=(("ip", "-4", "route", "del"), ("ip", "-6", "route", "del"),
                         ("ip", "-4", "rule", "del"), ("ip", "-6", "rule", "del")))
    method = Tproxy(FirewallSpec(port=5555), rec)
    method.setup_firewall()
    leftovers = [argv for argv in rec.argvs if "del" in argv]
    assert len(leftovers) == 4  # each delete tried once, failing: nothing was left
    assert rec.argvs[4:] == firewall.commands(method.setup_steps())
    rec.calls.clear()
    rec.fail = ()
    method.restore_firewall()
    assert rec.argvs == firewall.commands(method.restore_steps())
    rec.calls.clear()
    method.restore_firewall()  # a second call does nothing
    assert rec.calls == []


def test_leftover_duplicates_are_all_deleted() -> None:
    deleted = {"n": 0}

    def runner(step: Step) -> None:
        if step.argv[:4] == ("ip", "-4", "rule", "del"):
            deleted["n"] += 1
            if deleted["n"] > 2:  # two leftover copies, then "No such file or directory"
                raise FirewallError("no such rule")
        elif "del" in step.argv:
            raise FirewallError("no such route")

    Redirect(FirewallSpec(port=5555), runner).setup_firewall()  # TPROXY leftovers, any method
    assert deleted["n"] == 3


def test_failed_setup_rolls_back_what_it_added() -> None:
    rec = Recorder(fail=(("nft", "-f"),) + tuple(
        ("ip", fam, kind, "del") for fam in ("-4", "-6") for kind in ("rule", "route")))
    method = Tproxy(FirewallSpec(port=5555, ipv6=False), rec)
    with pytest.raises(FirewallError, match="nft -f -"):
        method.setup_firewall()
    assert rec.argvs[2:] == [
        ["ip", "-4", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", T],
        ["ip", "-4", "rule", "add", "fwmark", M, "lookup", T],
        ["nft", "-f", "-"],
        ["ip", "-4", "rule", "del", "fwmark", M, "lookup", T],
        ["ip", "-4", "route", "del", "local", "0.0.0.0/0", "dev", "lo", "table", T],
    ]
    assert method.installed == []


def test_run_step_names_the_command_and_the_tool_message() -> None:
    with pytest.raises(FirewallError) as exc:
        firewall.run_step(Step((sys.executable, "-c", "import sys; sys.exit('bad rule')")))
    assert str(exc.value).endswith("failed: bad rule")
    firewall.run_step(Step((sys.executable, "-c", "import sys; sys.stdin.read()"), "x\n"))


# -- refusals -------------------------------------------------------------------------------

def test_refused_without_nft(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(firewall, "_find", lambda tool: None if tool == "nft" else "/x")
    assert not Redirect(FirewallSpec(port=5555)).is_supported()
    assert Redirect(FirewallSpec(port=5555)).unsupported_reason() == (
        "--setup-firewall needs the 'nft' command, which is not installed: install the "
        "nftables package, or install the rules yourself (--print-firewall shows them) and "
        "leave out --setup-firewall")


def test_tproxy_refused_without_ip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(firewall, "_find", lambda tool: None if tool == "ip" else "/x")
    monkeypatch.setattr(firewall, "has_cap_net_admin", lambda: True)
    assert Redirect(FirewallSpec(port=5555)).unsupported_reason() is None
    assert "'ip' command" in Tproxy(FirewallSpec(port=5555)).unsupported_reason()


def test_refused_without_cap_net_admin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(firewall, "_find", lambda tool: "/x")
    monkeypatch.setattr(firewall, "has_cap_net_admin", lambda: False)
    assert Tproxy(FirewallSpec(port=5555)).unsupported_reason() == (
        "--setup-firewall needs CAP_NET_ADMIN, which this process lacks: run it as root, or "
        "install the rules yourself (--print-firewall shows them) and leave out "
        "--setup-firewall")


# -- the command line -----------------------------------------------------------------------

def parse(*argv: str) -> Config:
    parser = build_parser()
    return config_from_args(parser.parse_args(list(argv)))


def test_bare_t_means_redirect_and_r_is_optional() -> None:
    cfg = parse("-m", "client", "-p", "5555", "-t")
    assert (cfg.transparent, cfg.remote, cfg.mark, cfg.intercept) == ("redirect", None, 0, ())
    cfg = parse("-m", "server", "-p", "4444", "-t", "tproxy", "--mark", "0x10",
                "--setup-firewall", "--intercept", "80,8000-8100")
    assert (cfg.transparent, cfg.mark, cfg.setup_firewall) == ("tproxy", 16, True)
    assert cfg.intercept == ((80, 80), (8000, 8100))


def test_t_with_r_keeps_r_for_connections_not_intercepted() -> None:
    cfg = parse("-m", "client", "-p", "5555", "-t", "-r", "10.0.1.2:4444")
    assert cfg.remote == HostPort("10.0.1.2", 4444)
    help_text = build_parser().format_help()
    assert "With -t it is where connections go that were not intercepted" in " ".join(
        help_text.split())


@pytest.mark.parametrize(("args", "words"), [
    (["-m", "client", "-p", "5555"], ["-r/--remote", "-t"]),
    (["-m", "client", "-p", "5555", "-r", "h:1", "--setup-firewall"], ["--setup-firewall", "-t"]),
    (["-m", "client", "-p", "5555", "-r", "h:1", "--print-firewall"], ["--print-firewall", "-t"]),
    (["-m", "client", "-p", "5555", "-r", "h:1", "--intercept", "80"], ["--intercept", "-t"]),
    (["-m", "client", "-p", "5555", "-t", "tproxy", "--mark", M], [M, "another mark"]),
    (["-m", "client", "-p", "5555", "-t", "nat"], ["nat", "redirect", "tproxy"]),
    (["-m", "client", "-p", "5555", "-t", "--mark", "0"], ["mark 0", "out of range"]),
    (["-m", "client", "-p", "5555", "-t", "--intercept", "90-80"], ["reversed", "80-90"]),
    (["-m", "client", "-p", "5555", "-t", "--intercept", "80,,90"], ["port list"]),
], ids=["no-r-no-t", "setup-without-t", "print-without-t", "intercept-without-t",
        "tproxy-mark-clash", "bad-method", "mark-0", "reversed-range",
        "empty-item"])
def test_usage_errors(args: list[str], words: list[str]) -> None:
    res = proxy(*args)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mptcp-proxy: error: "), res.stderr
    for word in words:
        assert word in lines[0]


def test_print_firewall_exits_0_with_the_rules_on_stdout() -> None:
    res = proxy("-m", "client", "-p", "5555", "-t", "tproxy", "--setup-firewall",
                "--intercept", "4444", "--print-firewall")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert res.stdout.startswith("# mptcp-proxy -t tproxy, listener port 5555")
    assert f"\t\ttcp dport 4444 tproxy to :5555 meta mark set {M} accept\n" in res.stdout


def test_parse_helpers() -> None:
    assert parse_port_ranges("22") == ((22, 22),)
    assert parse_port_ranges(" 80 , 1-65535") == ((80, 80), (1, 65535))
    for bad in ("", "-80", "80-", "a", "0", "80-70000"):
        with pytest.raises(ConfigError):
            parse_port_ranges(bad)
    assert parse_mark("0xff") == 255 and parse_mark("10") == 10
    for bad in ("0", "-1", "0x100000000", "one"):
        with pytest.raises(ConfigError):
            parse_mark(bad)


# -- the original-destination decision -----------------------------------------------------

LOCAL = {"10.0.0.1", "10.0.1.1", "127.0.0.1"}


def is_local(host: str) -> bool:
    return host in LOCAL


def test_intercepted_goes_to_the_original_destination() -> None:
    # REDIRECT: rewritten from 10.9.9.9:80 to our listener
    assert decide(("10.9.9.9", 80), ("10.0.0.1", 5555), 5555, None, is_local) == HostPort(
        "10.9.9.9", 80)
    # TPROXY: the accepted socket's address is the original; -r does not matter then
    assert decide(("10.9.9.9", 5555), ("10.9.9.9", 5555), 5555, HostPort("h", 1),
                  is_local) == HostPort("10.9.9.9", 5555)
    # a service of this host itself on another port is not a loop
    assert decide(("10.0.1.1", 22), ("10.0.0.1", 5555), 5555, None, is_local) == HostPort(
        "10.0.1.1", 22)


def test_not_intercepted_goes_to_r_or_is_refused() -> None:
    fallback = HostPort("10.0.1.2", 4444)
    for original in (None, ("10.0.0.1", 5555)):
        assert decide(original, ("10.0.0.1", 5555), 5555, fallback, is_local) == fallback
        with pytest.raises(Refused, match="came straight to the listener 10.0.0.1:5555"):
            decide(original, ("10.0.0.1", 5555), 5555, None, is_local)


def test_redirected_to_itself_is_a_loop_even_with_r() -> None:
    with pytest.raises(Refused, match=r"10\.0\.1\.1:5555 is this proxy's own listener \(a loop"):
        decide(("10.0.1.1", 5555), ("10.0.0.1", 5555), 5555, HostPort("h", 1), is_local)


def test_is_local_address() -> None:
    from mptcpproxy.origdst import is_local_address, plain

    assert is_local_address("127.0.0.1")
    assert not is_local_address("192.0.2.77")  # TEST-NET-1, never configured here
    assert plain(("::ffff:10.0.0.1", 80, 0, 0)) == ("10.0.0.1", 80)
    assert plain(("2001:db8::1", 80, 0, 0)) == ("2001:db8::1", 80)


# -- conntrack netlink messages -------------------------------------------------------------

def test_conntrack_request_bytes() -> None:
    msg = conntrack.build_get_by_reply(("10.0.0.2", 4444), ("::ffff:10.0.0.1", 40000), seq=7)
    assert msg.hex() == (
        "48000000" "0101" "0100" "07000000" "00000000"  # nlmsghdr: CT_GET, NLM_F_REQUEST
        "02000000"  # nfgenmsg: AF_INET, NFNETLINK_V0, res_id 0
        "3400" "0280"  # CTA_TUPLE_REPLY | NLA_F_NESTED
        "1400" "0180" "0800" "0100" "0a000002" "0800" "0200" "0a000001"  # CTA_TUPLE_IP
        "1c00" "0280" "0500" "0100" "06000000"  # CTA_TUPLE_PROTO: CTA_PROTO_NUM tcp
        "0600" "0200" "115c0000" "0600" "0300" "9c400000"  # src port 4444, dst port 40000
    )


def test_conntrack_request_ipv6() -> None:
    msg = conntrack.build_get_by_reply(("fd00::2", 1), ("fd00::1", 2), seq=1)
    assert msg[16] == socket.AF_INET6
    assert bytes.fromhex("fd000000000000000000000000000002") in msg
    with pytest.raises(ValueError):
        conntrack.build_get_by_reply(("fd00::2", 1), ("10.0.0.1", 2))


def _ct_new(seq: int) -> bytes:
    tup = conntrack._tuple  # the request's own encoder builds a reply-shaped message
    _, orig = tup(conntrack.CTA_TUPLE_ORIG, ("10.0.0.1", 40000), ("10.77.1.2", 8080), 6)
    _, reply = tup(conntrack.CTA_TUPLE_REPLY, ("10.0.0.2", 4444), ("10.0.0.1", 40000), 6)
    body = struct.pack("=BBH", socket.AF_INET, 0, 0) + orig + reply
    return struct.pack("=IHHII", 16 + len(body), 0x0100, 0, seq, 0) + body


def _nl_error(seq: int, err: int) -> bytes:
    body = struct.pack("=i", -err) + b"\0" * 16
    return struct.pack("=IHHII", 16 + len(body), conntrack.NLMSG_ERROR, 0, seq, 0) + body


def test_conntrack_reply_parsing() -> None:
    assert conntrack.parse_reply(_ct_new(5), 5) == ("10.77.1.2", 8080)
    assert conntrack.parse_reply(_nl_error(5, errno.ENOENT), 5) is None
    with pytest.raises(conntrack.ConntrackError) as exc:
        conntrack.parse_reply(_nl_error(5, errno.EPERM), 5)
    assert exc.value.errno == errno.EPERM
    with pytest.raises(conntrack.ConntrackError):
        conntrack.parse_reply(_ct_new(4), 5)  # another request's answer
    with pytest.raises(conntrack.ConntrackError):
        conntrack.parse_reply(b"\x01\x02", 5)
