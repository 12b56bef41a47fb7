"""Transparent-mode firewall set-up: nftables rules and TPROXY policy routing as data.

Two methods, in the manner of sshuttle's: `Redirect` (nat REDIRECT; connections from
other hosts in prerouting and, when the proxy's own connections can be told apart by
--mark or by a non-root uid, local ones in output) and `Tproxy` (TPROXY in prerouting,
plus `ip rule fwmark M lookup T` and `ip route add local default dev lo table T` for
IPv4 and IPv6). `--source client` adds a `socket transparent` mark rule to either, with the
same policy routing (`SourceClient` alone without -t): the service's replies to a client's
address reach the proxy's transparent upstream socket.
Each has `is_supported()`, `setup_firewall()` and `restore_firewall()`;
every command is an argv list, run without a shell, and `restore_firewall()` removes
exactly what `setup_firewall()` added.

Everything lives in one table of our own, `inet mptcpproxy_<port>`. Its rule file starts
with `table X` + `delete table X`, so loading it replaces a leftover of a crashed run in
one transaction; the TPROXY mark and routing table are derived from the port too, so a
leftover rule or route is found and replaced at the next start.

Connections to this host's own addresses are left alone (its SSH or web UI must see the
real client), with one exception in Redirect's prerouting chain in server mode: an MPTCP
subflow joining a transparent server (a SYN with MP_JOIN) arrives at the server's
announced address with the original port, and must reach the listener with the port the
first subflow was redirected to. Tproxy leaves joins alone too (a tproxied listener gets
them only when it listens on the intercepted port itself; see docs/transparent.md).
"""

from __future__ import annotations

import logging
import os
import shlex
from dataclasses import dataclass

from mptcpproxy.config import Config
from mptcpproxy.fwcommands import (
    FirewallError,
    Runner,
    Step,
    _find,
    commands,
    has_cap_net_admin,
    run_step,
)

# with the names of fwcommands that the methods, srcaddr.py and the tests use (and patch) here
__all__ = ["METHODS", "TPROXY_BASE", "FirewallError", "FirewallSpec", "Method", "Redirect",
           "Runner", "SourceClient", "Step", "Tproxy", "commands", "has_cap_net_admin",
           "local_routing", "method_for", "run_step", "spec_from_config"]

log = logging.getLogger("mptcpproxy")

TPROXY_BASE = 0x6D70 << 16  # "mp": the TPROXY fwmark and routing table are BASE | port


@dataclass(frozen=True)
class FirewallSpec:
    """What the rules are built from."""

    port: int  # the proxy's listener
    mode: str = "client"  # client: TCP in, MPTCP out; server: MPTCP in, TCP out
    intercept: tuple[tuple[int, int], ...] = ()  # destination port ranges; (): all TCP
    mark: int = 0  # the proxy's own SO_MARK (0: none)
    uid: int | None = None  # the proxy's uid when not root: its sockets are skipped too
    ipv6: bool = True  # also IPv6 policy routing (TPROXY, --source client)
    source_client: bool = False  # --source client: deliver replies to transparent sockets

    @property
    def table(self) -> str:
        return f"mptcpproxy_{self.port}"

    @property
    def tproxy_mark(self) -> int:
        return TPROXY_BASE | self.port

    @property
    def route_table(self) -> int:
        return TPROXY_BASE | self.port


def _dport_match(spec: FirewallSpec) -> str:
    if not spec.intercept:
        return "meta l4proto tcp"
    items = [str(a) if a == b else f"{a}-{b}" for a, b in spec.intercept]
    return f"tcp dport {items[0]}" if len(items) == 1 else f"tcp dport {{ {', '.join(items)} }}"


class Method:
    """A way of steering connections to the proxy; subclasses give the rules."""

    name = ""
    tools: tuple[str, ...] = ("nft",)

    def __init__(self, spec: FirewallSpec, runner: Runner = run_step) -> None:
        self.spec = spec
        self.runner = runner
        self.installed: list[Step] = []  # restore steps of what is in place, in order

    # -- rules as data ----------------------------------------------------------------

    def chains(self) -> list[tuple[str, str, list[str]]]:
        """(chain name, base chain header, rules), one statement per line."""
        raise NotImplementedError

    def all_chains(self) -> list[tuple[str, str, list[str]]]:
        """chains(), and the chain of --source client when it is on."""
        if not self.spec.source_client:
            return self.chains()
        # The service's replies to a client's address, sent back to this host, belong to
        # the proxy's transparent upstream socket: marked here, then routed to it locally
        # by the policy routing (a SYN-ACK to a foreign address is dropped otherwise).
        return [*self.chains(), self._socket_chain("source_client")]

    def _socket_chain(self, name: str) -> tuple[str, str, list[str]]:
        # packets of the proxy's own transparent sockets: marked, then delivered locally
        return (name, "type filter hook prerouting priority mangle; policy accept;",
                [f"meta l4proto tcp socket transparent 1 meta mark set "
                 f"0x{self.spec.tproxy_mark:x} accept"])

    def keeps_open_connections(self) -> bool:  # --source client's replies need rules
        return self.spec.source_client

    def stop_diverting(self) -> None:
        """New connections flow as if the proxy were not there; what the open ones need
        stays until restore_firewall() (the listener's close, after its last one)."""
        if not self.installed or not self.keeps_open_connections():
            self.restore_firewall()
            return
        try:
            self.runner(Step(("nft", "-f", "-"),
                             self.nft_rules([self._socket_chain("open_connections")])))
        except FirewallError as exc:
            log.warning("firewall: %s", exc)
            self.restore_firewall()
            return
        log.info("firewall: table inet %s no longer diverts new connections; it keeps the "
                 "open ones' until they end", self.spec.table)

    def nft_rules(self, chains: list[tuple[str, str, list[str]]] | None = None) -> str:
        """The rule file for `nft -f -`: replaces our table, leftovers included."""
        table = f"inet {self.spec.table}"
        lines = [f"table {table}", f"delete table {table}", f"table {table} {{"]
        for name, header, rules in self.all_chains() if chains is None else chains:
            lines += [f"\tchain {name} {{", f"\t\t{header}"]
            lines += [f"\t\t{rule}" for rule in rules]
            lines.append("\t}")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def routing(self) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        """(add command, delete command) pairs of the policy routing, in setup order."""
        return local_routing(self.spec) if self.spec.source_client else []

    def pairs(self) -> list[tuple[Step, Step]]:
        """(setup step, its undo), in setup order: routing first, then the rules."""
        table = f"inet {self.spec.table}"
        return [(Step(add), Step(delete)) for add, delete in self.routing()] + [
            (Step(("nft", "-f", "-"), self.nft_rules()),
             Step(("nft", "delete", "table", *table.split())))
        ]

    def setup_steps(self) -> list[Step]:
        """Commands that install everything, in order."""
        return [step for step, _ in self.pairs()]

    def restore_steps(self) -> list[Step]:
        """Commands that remove everything, in order (the rules first, then routing)."""
        return [undo for _, undo in reversed(self.pairs())]

    # -- checks -------------------------------------------------------------------------

    def unsupported_reason(self) -> str | None:
        """None when setup_firewall() can work here, else one sentence saying why not."""
        manual = ("or install the rules yourself (--print-firewall shows them) and leave "
                  "out --setup-firewall")
        for tool in self.tools:
            if _find(tool) is None:
                package = {"nft": "nftables", "ip": "iproute2"}.get(tool, tool)
                return (f"--setup-firewall needs the '{tool}' command, which is not "
                        f"installed: install the {package} package, {manual}")
        if not has_cap_net_admin():
            return (f"--setup-firewall needs CAP_NET_ADMIN, which this process lacks: run "
                    f"it as root, {manual}")
        return None

    def is_supported(self) -> bool:
        return self.unsupported_reason() is None

    def notes(self) -> list[str]:
        return []

    # -- apply --------------------------------------------------------------------------

    def _clear_leftovers(self) -> None:
        # A crashed run may have left its policy routing (whatever its method was): delete
        # each until it fails, duplicates too. The table is replaced by the rule file.
        for _, undo in local_routing(self.spec):
            for _ in range(8):
                try:
                    self.runner(Step(undo))
                except FirewallError:
                    break
                log.info("firewall: removed a leftover: %s", shlex.join(undo))

    def setup_firewall(self) -> None:
        """Install the rules (replacing leftovers); on failure remove what was added."""
        self._clear_leftovers()
        for step, undo in self.pairs():
            try:
                self.runner(step)
            except FirewallError:
                self.restore_firewall()
                raise
            self.installed.insert(0, undo)
            log.debug("firewall: %s", shlex.join(step.argv))
        for text in self.notes():
            log.info("firewall: %s", text)
        log.info("firewall: installed table inet %s%s", self.spec.table,
                 " and its policy routing" if self.routing() else "")

    def restore_firewall(self) -> None:
        """Remove what setup_firewall() added; safe to call twice."""
        steps, self.installed = self.installed, []
        for step in steps:
            try:
                self.runner(step)
            except FirewallError as exc:
                log.warning("firewall: %s", exc)
        if steps:
            log.info("firewall: removed table inet %s%s", self.spec.table,
                     " and its policy routing" if self.routing() else "")

    def describe(self) -> str:
        spec = self.spec
        intercept = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spec.intercept)
        return (f"mptcp-proxy -t {self.name}, listener port {spec.port}, intercepting "
                f"{'TCP to port(s) ' + intercept if intercept else 'all TCP'}.")

    def manual(self) -> str:
        """The rules as a shell script, for --print-firewall."""
        out = [f"# {self.describe()}"]
        if self.spec.source_client:
            out.append("# --source client: the service's replies to the clients' addresses "
                       "reach the proxy's sockets (the service must route them to this host).")
        out.append("# Install (loading the table again replaces it):")
        out += [shlex.join(add) for add, _ in self.routing()]
        out += ["nft -f - <<'EOF'", self.nft_rules().rstrip("\n"), "EOF"]
        out.append("# Remove:")
        out += [shlex.join(step.argv) for step in self.restore_steps()]
        out += [f"# Note: {text}" for text in self.notes()]
        return "\n".join(out) + "\n"


class Redirect(Method):
    """nat REDIRECT to the listener; the proxy reads SO_ORIGINAL_DST (or conntrack)."""

    name = "redirect"

    def chains(self) -> list[tuple[str, str, list[str]]]:
        spec = self.spec
        catch = f"{_dport_match(spec)} redirect to :{spec.port}"
        # connections to this host itself (its SSH, its web UI) are delivered, not proxied:
        # their services must see the real client
        forwarded = ["fib daddr type local return", catch]
        if spec.mode == "server":
            # except MPTCP joins (MP_JOIN is option subtype 1) to an announced address of
            # this host: they must reach the listener the first subflow was redirected to
            forwarded.insert(0, f"fib daddr type local tcp option mptcp subtype 1 {catch}")
        chains = [("prerouting", "type nat hook prerouting priority dstnat; policy accept;",
                   forwarded)]
        skip = []
        if spec.mark:
            skip.append(f"meta mark 0x{spec.mark:x} return")  # the proxy's own (--mark)
        if spec.uid is not None:
            skip.append(f"meta skuid {spec.uid} return")  # the proxy's own (its user)
            if spec.mode == "client":
                # MPTCP's additional subflows are opened by the kernel as root, not as the
                # proxy's user; their SYNs carry an MPTCP option, local TCP ones do not
                skip.append("tcp option mptcp exists return")
        if skip:
            # local applications; connections to this host itself are left alone
            chains.append(("output", "type nat hook output priority -100; policy accept;",
                           [*skip, "fib daddr type local return", catch]))
        return chains

    def notes(self) -> list[str]:
        if self.spec.mark or self.spec.uid is not None:
            return []
        return ["connections of local applications are not intercepted: give --mark N or "
                "run the proxy as a dedicated user, so that the rules can skip its own"]


class Tproxy(Method):
    """TPROXY to the transparent listener; the accepted socket's address is the original."""

    name = "tproxy"
    tools = ("nft", "ip")

    def chains(self) -> list[tuple[str, str, list[str]]]:
        spec = self.spec
        return [("prerouting", "type filter hook prerouting priority mangle; policy accept;", [
            # the proxy's own connections to this host come back in through lo
            'iifname "lo" return',
            # connections to this host itself are delivered, not intercepted
            "fib daddr type local return",
            f"{_dport_match(spec)} tproxy to :{spec.port} "
            f"meta mark set 0x{spec.tproxy_mark:x} accept",
        ])]

    def notes(self) -> list[str]:
        spec = self.spec
        if spec.mode != "server" or spec.intercept == ((spec.port, spec.port),):
            return []
        return ["with -t tproxy in server mode, MPTCP subflows can join only when the proxy "
                "listens on the intercepted port itself (-p P --intercept P): the kernel "
                "accepts an MP_JOIN only on a listener with the connection's own port; "
                "-t redirect has no such limit"]

    def routing(self) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        return local_routing(self.spec)

    def keeps_open_connections(self) -> bool:  # the tproxy rule delivers their packets
        return True


class SourceClient(Method):
    """--source client without -t: only the delivery of the service's replies (the chain
    of Method.all_chains and the policy routing TPROXY uses too)."""

    name = "source-client"
    tools = ("nft", "ip")

    def chains(self) -> list[tuple[str, str, list[str]]]:
        return []

    def describe(self) -> str:
        return f"mptcp-proxy --source client, listener port {self.spec.port}."


def local_routing(spec: FirewallSpec) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """Packets with the spec's mark are delivered to this host (TPROXY, --source client):
    `ip rule fwmark M lookup T` and `ip route local default dev lo table T`, IPv4 and IPv6."""
    out = []
    families = [("-4", "0.0.0.0/0")] + ([("-6", "::/0")] if spec.ipv6 else [])
    for fam, default in families:
        route = ("local", default, "dev", "lo", "table", str(spec.route_table))
        rule = ("fwmark", f"0x{spec.tproxy_mark:x}", "lookup", str(spec.route_table))
        out.append((("ip", fam, "route", "add", *route), ("ip", fam, "route", "del", *route)))
        out.append((("ip", fam, "rule", "add", *rule), ("ip", fam, "rule", "del", *rule)))
    return out


METHODS: dict[str, type[Method]] = {"redirect": Redirect, "tproxy": Tproxy}


def spec_from_config(config: Config, ipv6: bool | None = None,
                     uid: int | None = None) -> FirewallSpec:
    """The rule spec for a transparent-mode configuration (uid: this process's, if not 0)."""
    if uid is None:
        uid = os.geteuid()
    if ipv6 is None:
        ipv6 = os.path.exists("/proc/net/if_inet6")
    return FirewallSpec(port=config.port, mode=config.mode, intercept=config.intercept,
                        mark=config.mark, uid=uid or None, ipv6=ipv6,
                        source_client=config.source == "client")


def method_for(config: Config, runner: Runner = run_step, **spec_args) -> Method:
    """The firewall method of `config.transparent` (SourceClient for --source client
    alone); its rules include those of --source client when it is on."""
    if config.transparent in METHODS:
        return METHODS[config.transparent](spec_from_config(config, **spec_args), runner)
    if config.source == "client":
        return SourceClient(spec_from_config(config, **spec_args), runner)
    raise ValueError(f"not a transparent-mode configuration: {config.transparent!r}")
