"""The options of issue 12 as a person meets them, without root: --send-proxy,
--accept-proxy, --proxy-timeout and --source client on the command line and in a --config
file, the usage errors, the rules --source client needs (as data and as --print-firewall
prints them), the start-up and --check findings about them, and the claimed addresses
--source client refuses."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from mptcpproxy import firewall, srcaddr
from mptcpproxy.cli import build_parser, config_from_args
from mptcpproxy.config import Config, HostPort
from mptcpproxy.configfile import load
from mptcpproxy.firewall import FirewallSpec, SourceClient, Tproxy

M = "0x6d70115c"  # TPROXY_BASE | 4444
T = "1836061020"


def proxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mptcpproxy", *args], capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)


def parse(*argv: str) -> Config:
    return config_from_args(build_parser().parse_args(list(argv)))


SERVER = ("-m", "server", "-p", "4444", "-r", "10.0.0.2:80")


def test_the_options_and_their_defaults():
    cfg = parse(*SERVER)
    assert (cfg.send_proxy, cfg.accept_proxy, cfg.proxy_timeout, cfg.source) == (
        None, False, 5.0, None)
    assert not cfg.per_connection
    cfg = parse(*SERVER, "--send-proxy", "--accept-proxy", "--proxy-timeout", "2.5",
                "--source", "client")
    assert (cfg.send_proxy, cfg.accept_proxy, cfg.proxy_timeout, cfg.source) == (
        "v2", True, 2.5, "client")
    assert parse(*SERVER, "--send-proxy=v1").send_proxy == "v1"
    for flag in ("--send-proxy", "--accept-proxy"):
        assert parse(*SERVER, flag).per_connection


@pytest.mark.parametrize(("args", "words"), [
    (["-m", "client", "-p", "5555", "-r", "h:1", "--source", "client"],
     ["--source client", "server mode"]),
    ([*SERVER, "--source", "server"], ["'server'", "client"]),
    ([*SERVER, "--send-proxy=v3"], ["v3", "v1", "v2"]),
    ([*SERVER, "--proxy-timeout", "0"], ["0 seconds"]),
    ([*SERVER, "--setup-firewall"], ["--setup-firewall", "-t", "--source client"]),
    ([*SERVER, "--source", "client", "--intercept", "80"], ["--intercept", "-t"]),
    ([*SERVER, "--source", "client", "--mark", M], [M, "another mark"]),
    ([*SERVER, "--proxy-timeout", "5"], ["--proxy-timeout", "--accept-proxy"]),
], ids=["source-in-client-mode", "source-server", "send-v3", "timeout-0",
        "setup-without-source", "intercept-with-source", "mark-clash",
        "timeout-without-accept"])
def test_usage_errors(args, words):
    res = proxy(*args)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mptcp-proxy: error: "), res.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_help_names_the_trust_and_the_rules():
    text = " ".join(build_parser().format_help().split())
    assert "keeping the client's address" in text
    assert "Anyone who can connect can claim any address" in text
    assert "usesrc clientip" in text


def test_config_file_keys(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(textwrap.dedent("""\
        [[listener]]
        mode = "server"
        port = 4444
        remote = "10.0.0.2:80"
        accept_proxy = true
        send_proxy = true
        proxy_timeout = 3
        source = "client"

        [[listener]]
        mode = "client"
        port = 5555
        remote = "10.0.0.1:4444"
        send_proxy = "v1"
        """))
    server, client = load(str(path)).listeners
    assert (server.accept_proxy, server.send_proxy, server.proxy_timeout, server.source) == (
        True, "v2", 3.0, "client")
    assert client.send_proxy == "v1"
    res = proxy("--config", str(path), "--check-config")
    assert res.returncode == 0, res.stderr
    assert "accept_proxy (proxy_timeout 3), send_proxy v2, source client" in res.stdout
    path.write_text(path.read_text().replace('mode = "server"', 'mode = "client"', 1))
    res = proxy("--config", str(path), "--check-config")
    assert res.returncode == 2 and "--source client only applies to server mode" in res.stderr


# -- the rules ------------------------------------------------------------------------------

def test_source_client_rules():
    method = SourceClient(FirewallSpec(port=4444, mode="server", source_client=True))
    assert method.nft_rules() == f"""\
table inet mptcpproxy_4444
delete table inet mptcpproxy_4444
table inet mptcpproxy_4444 {{
\tchain source_client {{
\t\ttype filter hook prerouting priority mangle; policy accept;
\t\tmeta l4proto tcp socket transparent 1 meta mark set {M} accept
\t}}
}}
"""
    # the policy routing is TPROXY's, for the same port (test_firewall has its argv)
    tproxy = Tproxy(FirewallSpec(port=4444, mode="server"))
    assert method.setup_steps()[:-1] == tproxy.setup_steps()[:-1]
    assert firewall.commands(method.setup_steps()[-1:]) == [["nft", "-f", "-"]]
    assert method.restore_steps() == tproxy.restore_steps()


def test_transparent_server_with_source_client_has_both_chains():
    cfg = parse("-m", "server", "-p", "4444", "-t", "tproxy", "--source", "client",
                "--intercept", "4444")
    method = firewall.method_for(cfg, ipv6=False, uid=0)
    assert [name for name, _, _ in method.all_chains()] == ["prerouting", "source_client"]
    assert len(method.setup_steps()) == 3  # the routing once, then the table
    redirect = firewall.method_for(parse("-m", "server", "-p", "4444", "-t", "--source",
                                         "client"), ipv6=False, uid=0)
    assert firewall.commands(redirect.setup_steps())[0][:4] == ["ip", "-4", "route", "add"]


def test_print_firewall_for_source_client():
    res = proxy(*SERVER, "--source", "client", "--print-firewall")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("# mptcp-proxy --source client, listener port 4444.\n")
    assert f"meta l4proto tcp socket transparent 1 meta mark set {M} accept\n" in res.stdout
    assert f"ip -4 rule add fwmark {M} lookup {T}\n" in res.stdout
    assert "nft delete table inet mptcpproxy_4444\n" in res.stdout


def test_setup_then_restore_with_a_recorder():
    calls = []
    method = firewall.method_for(parse(*SERVER, "--source", "client", "--setup-firewall"),
                                 runner=calls.append, ipv6=False)
    method.setup_firewall()
    method.restore_firewall()
    argvs = [list(step.argv) for step in calls]
    # leftovers first (each delete until one fails: the recorder never fails, so 8 each)
    assert argvs[16:] == [
        ["ip", "-4", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", T],
        ["ip", "-4", "rule", "add", "fwmark", M, "lookup", T],
        ["nft", "-f", "-"],
        ["nft", "delete", "table", "inet", "mptcpproxy_4444"],
        ["ip", "-4", "rule", "del", "fwmark", M, "lookup", T],
        ["ip", "-4", "route", "del", "local", "0.0.0.0/0", "dev", "lo", "table", T],
    ]


# -- finding the rules ----------------------------------------------------------------------

RULESET = f"""table inet mptcpproxy_4444 {{
\tchain source_client {{
\t\ttype filter hook prerouting priority mangle; policy accept;
\t\tmeta l4proto tcp socket transparent 1 meta mark set {M} accept
\t}}
}}
"""
IP_RULES = json.dumps([{"priority": 0, "src": "all", "table": "local"},
                       {"priority": 32765, "src": "all", "fwmark": M, "table": T},
                       {"priority": 32766, "src": "all", "table": "main"}])
LOCAL_ROUTE = json.dumps([{"type": "local", "dst": "default", "dev": "lo"}])


def fake(outputs: dict[tuple[str, ...], str | None]):
    def run(argv):
        return outputs.get(tuple(argv), "[]" if argv[0] == "ip" else None)
    return run


def test_missing_rules_found_per_ip_version():
    both = {("nft", "list", "ruleset"): RULESET}
    for fam in ("-4", "-6"):
        both[("ip", "-j", fam, "rule", "show")] = IP_RULES
        both[("ip", "-j", fam, "route", "show", "table", T, "type", "local")] = LOCAL_ROUTE
    assert srcaddr.missing_rules(fake(both), ipv6=True) == []
    no_v6_route = {k: v for k, v in both.items() if k[2] != "-6" or k[3] != "route"}
    assert srcaddr.missing_rules(fake(no_v6_route), ipv6=True) == ["IPv6"]
    assert srcaddr.missing_rules(fake(no_v6_route), ipv6=False) == []
    no_mark = {**both, ("nft", "list", "ruleset"): "table inet other {\n}\n"}
    assert srcaddr.missing_rules(fake(no_mark), ipv6=True) == ["IPv4", "IPv6"]
    other_mark = {**both, ("nft", "list", "ruleset"): RULESET.replace(M, "0x1")}
    assert srcaddr.missing_rules(fake(other_mark), ipv6=False) == ["IPv4"]
    assert srcaddr.missing_rules(fake({}), ipv6=True) is None  # no nft: cannot tell


def test_check_notes_say_what_is_missing(monkeypatch):
    monkeypatch.setattr(firewall, "has_cap_net_admin", lambda: False)
    notes = srcaddr.check_notes(4444, run=fake({("nft", "list", "ruleset"): ""}))
    texts = [text for text, *_ in notes]
    assert "CAP_NET_ADMIN" in texts[0]
    assert "no rule here delivers the service's replies" in texts[1]
    assert notes[1][1][0] == ("mptcp-proxy -m server -p 4444 -r HOST:PORT --source client "
                              "--setup-firewall")


def test_check_prints_the_notes():
    res = proxy("--check", "-m", "server", "--source", "client", "-p", "4444")
    assert res.returncode in (0, 1), res.stderr
    assert "Traceback" not in res.stderr
    assert "--source client" in res.stdout


def test_refused_claimed_sources():
    def local(host: str) -> bool:
        return host == "192.0.2.1"

    assert srcaddr.refusal("203.0.113.7", local) is None
    assert srcaddr.refusal("2001:db8::7", local) is None
    for host, why in (("127.0.0.1", "loopback"), ("::1", "loopback"), ("224.0.0.1", "multicast"),
                      ("ff02::1", "multicast"), ("0.0.0.0", "unspecified"),
                      ("fe80::1", "link-local"), ("255.255.255.255", "broadcast"),
                      ("192.0.2.1", "this host")):
        assert why in srcaddr.refusal(host, local), host


def test_print_command():
    cfg = Config(mode="server", port=4444, remote=HostPort("10.0.0.2", 80), source="client")
    assert srcaddr.print_command(cfg) == ("mptcp-proxy -m server -p 4444 -r 10.0.0.2:80 "
                                          "--source client --print-firewall")
