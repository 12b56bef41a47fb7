"""--source client: connecting to the service from the client's own address (HAProxy's
`usesrc clientip`).

The upstream socket gets IP_TRANSPARENT (IPV6_TRANSPARENT, CAP_NET_ADMIN) and is bound to
the client's address (sockets.bind_transparent). The service answers that address, so it
must route it back through this host; here the kernel drops a reply to an address that is
not local (IpInAddrErrors) and the connect times out, unless rules deliver it to the socket
(firewall.py installs them with --setup-firewall; the recipe is in NOTES-mptcp.md):

    nft: hook prerouting priority mangle: meta l4proto tcp socket transparent 1
         meta mark set M accept
    ip rule add fwmark M lookup T; ip route add local default dev lo table T   (-4 and -6)

This module refuses claimed addresses the proxy must not connect from, checks the
capability at start-up, and finds whether such rules are in place (a warning at start-up,
notes in --check).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import socket
import subprocess
from collections.abc import Callable, Sequence

from mptcpproxy import sockets
from mptcpproxy.config import Config
from mptcpproxy.origdst import is_local_address

log = logging.getLogger("mptcpproxy")

COMMAND_TIMEOUT = 5.0
_MARK_RULE = re.compile(r"\bsocket transparent 1\b.*\bmeta mark set (0x[0-9a-f]+|[0-9]+)")

Runner = Callable[[Sequence[str]], "str | None"]


def refusal(host: str, is_local: Callable[[str], bool] = is_local_address) -> str | None:
    """None when the proxy may connect from `host`, else why not (a phrase for a log line).
    A client may claim any address in a PROXY header: never one of this host's own (that
    would borrow the trust a service gives this host), nor one nobody can answer."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "not an IP address"
    for what, test in (("an unspecified address", ip.is_unspecified),
                       ("a loopback address", ip.is_loopback),
                       ("a multicast address", ip.is_multicast),
                       ("a link-local address", ip.is_link_local),
                       ("a broadcast address", ip == ipaddress.IPv4Address("255.255.255.255"))):
        if test:
            return what
    if is_local(host):
        return "an address of this host"
    return None


def capability_problem() -> str | None:
    """None when this process may set IP_TRANSPARENT, else the sentence to stop with."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            sockets.set_transparent(probe)
    except PermissionError:
        return ("--source client needs CAP_NET_ADMIN to connect from the client's address "
                "(IP_TRANSPARENT): run the proxy as root or give it CAP_NET_ADMIN")
    except OSError as exc:
        return f"--source client cannot set IP_TRANSPARENT here: {os.strerror(exc.errno or 0)}"
    return None


def _run(argv: Sequence[str]) -> str | None:
    from mptcpproxy.firewall import _find  # the same search path as the rules' commands

    try:
        res = subprocess.run([_find(argv[0]) or argv[0], *argv[1:]], capture_output=True,
                             text=True, timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout if res.returncode == 0 else None


def missing_rules(run: Runner = _run, ipv6: bool | None = None) -> list[str] | None:
    """The IP versions ("IPv4", "IPv6") whose replies to a transparent socket no rule here
    delivers; [] when both are in place; None when it cannot tell (no nft, no permission)."""
    ruleset = run(("nft", "list", "ruleset"))
    if ruleset is None:
        return None
    marks = {int(m, 0) for m in _MARK_RULE.findall(ruleset)}
    if ipv6 is None:
        ipv6 = os.path.exists("/proc/net/if_inet6")
    missing = []
    for fam, name in (("-4", "IPv4"), ("-6", "IPv6"))[:2 if ipv6 else 1]:
        routed = marks and _routed_locally(marks, fam, run)
        if routed is None:
            return None
        if not routed:
            missing.append(name)
    return missing


def _routed_locally(marks: set[int], fam: str, run: Runner) -> bool | None:
    """Whether an `ip rule` sends one of these marks to a table whose default is local."""
    try:
        rules = json.loads(run(("ip", "-j", fam, "rule", "show")) or "null")
        if rules is None:
            return None
        for rule in rules:
            if "fwmark" not in rule or "table" not in rule:
                continue
            mask = int(rule.get("fwmask", "0xffffffff"), 0)
            if not any(m & mask == int(rule["fwmark"], 0) & mask for m in marks):
                continue
            routes = json.loads(run(("ip", "-j", fam, "route", "show", "table",
                                     str(rule["table"]), "type", "local")) or "[]")
            if any(r.get("dst") == "default" and r.get("dev") == "lo" for r in routes):
                return True
    except (ValueError, TypeError, AttributeError):
        return None
    return False


def print_command(config: Config) -> str:
    """The command line that prints this listener's rules."""
    where = f"-t {config.transparent}" if config.transparent else f"-r {config.remote}"
    return (f"mptcp-proxy -m server -p {config.port} {where} --source client "
            "--print-firewall")


def _missing_text(missing: list[str]) -> str:
    return (f"no rule here delivers the service's replies to the clients' addresses to "
            f"this proxy ({' and '.join(missing)}: no nftables 'socket transparent 1 meta "
            "mark set' rule with an 'ip rule fwmark' to a table with 'local default dev "
            "lo'), so its connections to the service will time out")


def prepare(config: Config, label: str) -> str | None:
    """Start-up checks of a --source client listener: the sentence to stop with, or None;
    missing rules are a warning (they may come from elsewhere after the start)."""
    why = capability_problem()
    if why is not None:
        return why
    if config.setup_firewall:
        return None
    missing = missing_rules()
    if missing is None:
        log.debug("listener %s: cannot tell whether the rules of --source client are in "
                  "place (nft list ruleset failed)", label)
    elif missing:
        log.warning("listener %s: --source client: %s; add --setup-firewall, or install "
                    "the rules that '%s' prints", label, _missing_text(missing),
                    print_command(config))
    return None


def check_notes(port: int | None,
                run: Runner = _run) -> list[tuple[str, tuple[str, ...], bool]]:
    """What `--check --source client` says: (text, fixes, blocking) for each thing missing;
    blocking as at start-up: without CAP_NET_ADMIN the proxy refuses to start, missing
    rules are a warning (--setup-firewall installs them at start)."""
    from mptcpproxy.firewall import has_cap_net_admin

    notes = []
    if not has_cap_net_admin():
        notes.append(("--source client needs CAP_NET_ADMIN (IP_TRANSPARENT), which this "
                      "process lacks", ("run the proxy as root, or give it CAP_NET_ADMIN "
                                        "(AmbientCapabilities=CAP_NET_ADMIN in its unit)",),
                      True))
    missing = missing_rules(run)
    command = f"mptcp-proxy -m server -p {port or 'PORT'} -r HOST:PORT --source client"
    fixes = (f"{command} --setup-firewall",
             f"{command} --print-firewall   (and install the rules it prints)")
    if missing is None:
        notes.append(("--source client: cannot tell whether its rules are in place ('nft "
                      "list ruleset' failed: nftables missing, or no CAP_NET_ADMIN)", fixes,
                      False))
    elif missing:
        notes.append((f"--source client: {_missing_text(missing)}", fixes, False))
    return notes
