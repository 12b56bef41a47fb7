"""`mptcp-proxy --check`: can MPTCP open extra subflows in this network namespace?

Judges the kernel's state (kernelstate.py: the `net.mptcp.*` sysctls, an MPTCP socket,
the in-kernel path manager's limits and endpoints) and says in plain words what prevents
extra subflows and which commands fix it. Exit code 0 when extra subflows are possible,
1 otherwise (also when --source client, asked about, cannot work here). Also runnable as
`python -m mptcpproxy.check [-m client|server] [-b ADDR]`.
`startup_warnings()` gives a server proxy the findings it logs at start.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import sys
from dataclasses import dataclass, field
from typing import TextIO

from mptcpproxy import sockets
from mptcpproxy.config import Config, ConfigError, parse_bind
from mptcpproxy.joinwatch import REMEDY, SCALE_OUT_DOC, unanswered_joins
from mptcpproxy.kernelstate import (
    Endpoint,
    KernelState,
    parse_addresses,
    parse_endpoints,
    parse_limits,
    read_state,
)

__all__ = ["Endpoint", "Finding", "KernelState", "diagnose", "format_report", "main",
           "parse_addresses", "parse_endpoints", "parse_limits", "read_state", "run_check",
           "startup_warnings"]

log = logging.getLogger(__name__)

LIMIT_MAX = 8  # MPTCP_PM_ADDR_MAX in net/mptcp/pm_netlink.c: `limits set` refuses more
STARTUP_IP_TIMEOUT = 2.0  # a proxy's start waits no longer for each `ip` command


@dataclass(frozen=True)
class Finding:
    blocking: bool  # True: this alone prevents extra subflows
    text: str
    fixes: tuple[str, ...] = field(default=())
    warn: bool = False  # also a warning at a server proxy's start when not blocking
    feature: str | None = None  # what it blocks, when not extra subflows: "--source client"


def _is_local(endpoint: Endpoint, state: KernelState) -> bool:
    if state.local_addresses is None:
        return True
    return str(ipaddress.ip_address(endpoint.address)) in state.local_addresses


def _limits_fix(state: KernelState, subflows: int, accepted: int) -> str:
    subflows = min(LIMIT_MAX, max(subflows, state.subflows or 0))
    accepted = min(LIMIT_MAX, max(accepted, state.add_addr_accepted or 0))
    return f"ip mptcp limits set subflows {subflows} add_addr_accepted {accepted}"


def _available(state: KernelState) -> list[Finding]:
    """Findings about MPTCP itself; blocking ones end the diagnosis."""
    if state.socket_errno or state.enabled == 0:
        # the sentence the proxy itself says at start-up, fix included
        return [Finding(True, sockets.mptcp_refusal(state.socket_errno or errno.ENOPROTOOPT))]
    if state.path_manager not in (None, "kernel"):
        return [Finding(
            False,
            f"the path manager is '{state.path_manager}', not the in-kernel one: extra subflows "
            "come from a userspace daemon (for example mptcpd), which this check cannot see; "
            "the limits and endpoints below are not used",
            ("sysctl -w net.mptcp.path_manager=kernel   (Linux < 6.15: net.mptcp.pm_type=0)",),
        )]
    if state.ip_error:
        return [Finding(True, f"cannot read the MPTCP limits and endpoints: {state.ip_error}",
                        ("apt-get install iproute2",))]
    return []


def _endpoint_notes(state: KernelState, mode: str | None) -> list[Finding]:
    notes = []
    wanted = {"client": "subflow", "server": "signal"}.get(mode or "", "signal|subflow")
    for ep in state.endpoints or ():
        dev = ep.dev or "DEV"
        if not ep.flags & {"signal", "subflow", "implicit"}:
            notes.append(Finding(
                False,
                f"endpoint {ep} has neither the signal nor the subflow flag: the kernel neither "
                "announces it nor opens subflows from it",
                (f"ip mptcp endpoint delete id {ep.id} && "
                 f"ip mptcp endpoint add {ep.address} dev {dev} {wanted}",),
            ))
        if not _is_local(ep, state):
            notes.append(Finding(
                False,
                f"endpoint {ep} is not an address of this host: subflows from it fail, and peers "
                "reach it only through a NAT that forwards it",
                (f"ip mptcp endpoint delete id {ep.id}",),
            ))
    return notes


def _client(state: KernelState, subflow_eps: list[Endpoint]) -> list[Finding]:
    accepted = state.add_addr_accepted or 0
    if not subflow_eps and not accepted:
        return [Finding(
            True,
            "as a client, this host opens no extra subflow: no endpoint has the subflow flag, "
            "and add_addr_accepted is 0 so the addresses the server announces are ignored",
            (_limits_fix(state, 2, 2), "ip mptcp endpoint add ADDR dev DEV subflow"),
        )]
    notes = []
    if not accepted:
        notes.append(Finding(
            False,
            "add_addr_accepted is 0: the client ignores the addresses the server announces and "
            "uses only its own subflow endpoints",
            (_limits_fix(state, 2, 2),),
        ))
    if 0 < (state.subflows or 0) < len(subflow_eps):
        notes.append(Finding(
            False,
            f"the subflows limit ({state.subflows}) is below the number of subflow endpoints "
            f"({len(subflow_eps)}): some of them stay unused",
            (_limits_fix(state, len(subflow_eps), accepted),),
        ))
    return notes


def _same(a: str, b: str) -> bool:
    return ipaddress.ip_address(a) == ipaddress.ip_address(b)


def _bound(bind: str | None) -> bool:
    """Whether a listener on `bind` misses some of this host's addresses (-b ADDR)."""
    return bind is not None and not ipaddress.ip_address(bind).is_unspecified


def _listened(ep: Endpoint, bind: str | None) -> bool:
    """Whether a join sent to signal endpoint `ep` finds a listener, the proxy's bound to
    `bind`: the kernel accepts an MP_JOIN only on a listener bound to the join's address
    and port (an endpoint with its own port has a listener of the kernel's)."""
    if ep.port or bind is None:  # None: dual-stack ::
        return True
    bound = ipaddress.ip_address(bind)
    if bound.is_unspecified:  # -b :: is IPv6 only
        return ipaddress.ip_address(ep.address).version == bound.version
    return _same(ep.address, bind)


CHECKSUM_NOTE = (
    "DSS checksums are off (net.mptcp.checksum_enabled = 0): a kernel bug that delivers "
    "corrupted bytes on connections with a joined subflow under packet loss was seen on "
    "Linux 6.18 (about 1 connection in 100; docs/operating.md, 'Data integrity and the "
    "kernel'); with checksums on at both ends the kernel catches it, for 5-8 % of bulk speed")
C_FLAG_FIX = "sysctl -w net.mptcp.allow_join_initial_addr_port=1"
SIGNAL_FIX = "ip mptcp endpoint add ADDR2 dev DEV2 signal"
UNBIND_FIX = ("leave out -b, so that the proxy listens on every address (restrict who may "
              "connect with a firewall if needed)")
KERNEL_LISTENER = "(with a port, the kernel itself listens there for joins)"


def _port_fix(ep: Endpoint | None) -> str:
    if ep is None:
        return f"ip mptcp endpoint add ADDR2 dev DEV2 port PORT signal   {KERNEL_LISTENER}"
    return (f"ip mptcp endpoint delete id {ep.id} && ip mptcp endpoint add {ep.address} "
            f"dev {ep.dev or 'DEV'} port PORT signal   {KERNEL_LISTENER}")


def _server(state: KernelState, signal_eps: list[Endpoint], bind: str | None) -> list[Finding]:
    # Joins arrive at the address a client connected to, unless the C flag forbids it, and
    # at the announced addresses, where they need a listener.
    c_flag = state.allow_join_initial_addr_port == 0
    others = [ep for ep in signal_eps if ep.port or not _bound(bind) or not _same(ep.address, bind)]
    reached = [ep for ep in others if _listened(ep, bind)]
    missed = [ep for ep in others if not _listened(ep, bind)]
    if missed:
        text = (f"the proxy listens on {bind} only (-b): the kernel accepts an MPTCP join only "
                "on a listener bound to the address it is sent to, so joins to the announced "
                f"address{'es' if len(missed) > 1 else ''} "
                f"{', '.join(ep.address for ep in missed)} are reset")
        fixes = (UNBIND_FIX, *(_port_fix(ep) for ep in missed))
        if reached:
            return [Finding(False, text, fixes, warn=True)]
        if c_flag:
            return [Finding(True, f"{text}, and net.mptcp.allow_join_initial_addr_port is 0 "
                            f"so clients may not join {bind} either: every MPTCP connection "
                            "has one subflow", (*fixes, C_FLAG_FIX), warn=True)]
        return [Finding(False, f"{text}: extra subflows come only from the client's own "
                        f"subflow endpoints, joining {bind}", fixes, warn=True)]
    if reached:
        return []
    none = "no endpoint has the signal flag" + (
        f" and another address than {bind}" if signal_eps else "")
    signal_fix = _port_fix(None) if _bound(bind) else SIGNAL_FIX
    if c_flag:
        return [Finding(
            True,
            "net.mptcp.allow_join_initial_addr_port is 0 (the C flag): clients may not join "
            f"the address they connected to, and this host announces no other address "
            f"({none}): every MPTCP connection has one subflow",
            (C_FLAG_FIX, signal_fix),
        )]
    return [Finding(
        False,
        f"as a server, this host announces no address ({none}): extra subflows come only "
        "from the client's own subflow endpoints",
        (signal_fix,),
    )]


def _remedy_fixes(state: KernelState, signal_eps: list[Endpoint]) -> tuple[str, ...]:
    """What this server still lacks of the scale-out remedy, as commands."""
    fixes = [] if signal_eps else ["ip mptcp endpoint add OWN_ADDR dev DEV signal"]
    if state.allow_join_initial_addr_port != 0:
        fixes.append("sysctl -w net.mptcp.allow_join_initial_addr_port=0")
    if not fixes:  # both in place: the count may predate them
        return ("nothing here: this host announces its own address with the C flag set; the "
                "count may predate that: watch whether it still rises (nstat -az "
                "MPJoinNoTokenFound) and fix the other servers the same way",)
    return (" && ".join(fixes) + f"   (on every server behind the load balancer: "
            f"{SCALE_OUT_DOC})",)


def _join_counters(state: KernelState, mode: str | None,
                   signal_eps: list[Endpoint]) -> list[Finding]:
    counters = state.counters or {}
    notes = []
    lost = counters.get("MPJoinNoTokenFound", 0)
    if mode in (None, "server") and lost:
        notes.append(Finding(
            False,
            f"MPJoinNoTokenFound is {lost}: joins for unknown connections arrive here: is a "
            "load balancer spreading subflows over several servers? (the joins are reset, "
            f"their connections keep one subflow; see {SCALE_OUT_DOC})",
            _remedy_fixes(state, signal_eps),
        ))
    unanswered = unanswered_joins(counters)
    if mode in (None, "client") and unanswered:
        notes.append(Finding(
            False,
            f"{unanswered} of the {counters['MPJoinSynTx']} joins this host sent were not "
            f"answered (MPJoinSynTx {counters['MPJoinSynTx']}, MPJoinSynAckRx "
            f"{counters['MPJoinSynAckRx']}): refused by the server (ip mptcp monitor shows "
            "SF_CLOSED error=111: a load balancer may send joins to another server than "
            "their connection's) or lost on the way",
            (f"{REMEDY}   ({SCALE_OUT_DOC})",
             "ip route add ANNOUNCED_ADDR via GATEWAY dev DEV   (a route to each address "
             "the servers announce, on the path it should take)"),
        ))
    return notes


def diagnose(state: KernelState, mode: str | None = None,
             bind: str | None = None) -> list[Finding]:
    """What prevents extra subflows for `mode` ("client", "server", or None for both);
    `bind`: the address a server proxy listens on (-b), None for every address."""
    findings = _available(state)
    if findings:  # MPTCP is missing, or the in-kernel path manager is not in charge
        return findings
    if not state.subflows:
        findings.append(Finding(
            True,
            "the subflows limit is 0: the kernel neither opens nor accepts any extra subflow",
            (_limits_fix(state, 2, 2 if mode != "server" else 0),),
        ))
    findings += _endpoint_notes(state, mode)
    usable = [ep for ep in state.endpoints or () if _is_local(ep, state)]
    subflow_eps = [ep for ep in usable if ep.flags & {"subflow", "fullmesh"}]
    signal_eps = [ep for ep in usable if "signal" in ep.flags]
    if mode in (None, "client"):
        findings += _client(state, subflow_eps)
    if mode in (None, "server"):
        findings += _server(state, signal_eps, bind)
    if state.checksum_enabled == 0 and state.subflows:
        findings.append(Finding(False, CHECKSUM_NOTE, ("sysctl -w net.mptcp.checksum_enabled=1",)))
    return findings + _join_counters(state, mode, signal_eps)


def _describe(state: KernelState) -> list[str]:
    if state.enabled is None:
        enabled = "no /proc/sys/net/mptcp"
    else:
        enabled = f"net.mptcp.enabled = {state.enabled}"
    created = "an MPTCP socket can be created" if not state.socket_errno else (
        f"creating an MPTCP socket fails with {errno.errorcode.get(state.socket_errno, '?')}"
    )
    lines = [
        f"  MPTCP:         {'yes' if not state.socket_errno else 'NO'} ({enabled}; {created})",
        f"  path manager:  {state.path_manager or 'unknown'}",
    ]
    if state.subflows is not None:
        lines.append(f"  limits:        subflows {state.subflows}, "
                     f"add_addr_accepted {state.add_addr_accepted}")
    if state.allow_join_initial_addr_port is not None:
        may = "may" if state.allow_join_initial_addr_port else "may NOT (the C flag)"
        lines.append(f"  joins:         net.mptcp.allow_join_initial_addr_port = "
                     f"{state.allow_join_initial_addr_port}: clients {may} join the address "
                     "they connected to")
    if state.checksum_enabled is not None:
        lines.append(f"  checksums:     net.mptcp.checksum_enabled = {state.checksum_enabled}")
    counters = state.counters or {}
    names = [n for n in ("MPJoinSynTx", "MPJoinSynAckRx", "MPJoinNoTokenFound") if n in counters]
    if names:
        lines.append("  join counters: " + ", ".join(f"{n} {counters[n]}" for n in names)
                     + " (since the namespace was made)")
    if state.endpoints is not None:
        lines.append(f"  endpoints:     {len(state.endpoints) or 'none'}")
        lines += [f"    {ep}" for ep in state.endpoints]
    return lines


def format_report(state: KernelState, findings: list[Finding], mode: str | None,
                  bind: str | None = None) -> str:
    """The text `--check` prints."""
    role = f"as a {mode}" if mode else "as client and as server"
    lines = [f"MPTCP check for this network namespace ({role}):", *_describe(state)]
    if bind is not None and mode != "client":
        lines.append(f"  listener:      {bind} only (-b)")
    for title, blocking in (("Problems", True), ("Notes", False)):
        chosen = [f for f in findings if f.blocking is blocking]
        if chosen:
            lines.append(f"{title}:")
        for finding in chosen:
            lines.append(f"  - {finding.text}")  # one line: commands in it stay whole
            # Several fixes are alternatives; a sequence is one fix joined with &&.
            lines += [f"    {'fix:' if i == 0 else ' or:'} {fix}"
                      for i, fix in enumerate(finding.fixes)]
    possible = not any(f.blocking and f.feature is None for f in findings)
    result = ("extra subflows are possible" if possible else
              "extra subflows are NOT possible: MPTCP connections use one path")
    features = sorted({f.feature for f in findings if f.blocking and f.feature})
    if features:
        result += (", but " if possible else "; and ") + " and ".join(features) + (
            " cannot work here (see Problems)")
    lines.append(f"Result: {result}.")
    return "\n".join(lines) + "\n"


def run_check(mode: str | None = None, out: TextIO | None = None, ip: str = "ip",
              bind: str | None = None, source: str | None = None,
              port: int | None = None) -> int:
    """Print the report for this namespace; 0 when extra subflows are possible, else 1.
    `bind`: judge a server proxy listening on that address only (-b); `source`: "client"
    adds what --source client needs (for a listener on `port`): 1 also when it cannot
    work here."""
    state = read_state(ip)
    log.debug("MPTCP state: %s", state)
    findings = diagnose(state, mode, bind)
    if source == "client":
        from mptcpproxy import srcaddr

        findings += [Finding(blocking, text, fixes, feature="--source client")
                     for text, fixes, blocking in srcaddr.check_notes(port)]
    (out or sys.stdout).write(format_report(state, findings, mode, bind))
    return 1 if any(f.blocking for f in findings) else 0


def startup_warnings(config: Config, state: KernelState | None = None) -> list[str]:
    """The warnings a server proxy logs at start: what leaves its connections one subflow
    here (the kernel's state read now unless given), each with its fix. Never raises."""
    try:
        if not config.listen_mptcp:
            return []
        state = state or read_state(timeout=STARTUP_IP_TIMEOUT)
        if state.ip_error:  # no claim without the endpoints; --check says why
            log.debug("no start-up check of the MPTCP settings: %s", state.ip_error)
            return []
        return [f"{f.text}; fix: " + "; or: ".join(f.fixes)
                for f in diagnose(state, "server", config.bind) if f.blocking or f.warn]
    except Exception as exc:  # noqa: BLE001 -- a diagnosis never stops a start
        log.debug("no start-up check of the MPTCP settings: %r", exc)
        return []


def _bind(text: str) -> str:
    try:
        return parse_bind(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mptcpproxy.check",
        description="Check whether MPTCP can open extra subflows in this network namespace.",
    )
    parser.add_argument("-m", "--mode", choices=("client", "server"),
                        help="judge for this role only (default: both)")
    parser.add_argument("-b", "--bind", metavar="ADDR", type=_bind,
                        help="a server proxy listens on this address only")
    args = parser.parse_args(argv)
    return run_check(args.mode, bind=args.bind)


if __name__ == "__main__":
    raise SystemExit(main())
