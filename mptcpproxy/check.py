"""`mptcp-proxy --check`: can MPTCP open extra subflows in this network namespace?

Reads the `net.mptcp.*` sysctls, tries to create an MPTCP socket, and reads the in-kernel
path manager's limits and endpoints with `ip` (iproute2). Then says in plain words what
prevents extra subflows and which commands fix it. Exit code 0 when extra subflows are
possible, 1 otherwise. Also runnable as `python -m mptcpproxy.check [-m client|server]`.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import logging
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from mptcpproxy import sockets

log = logging.getLogger(__name__)

SYSCTL_DIR = Path("/proc/sys/net/mptcp")
LIMIT_MAX = 8  # MPTCP_PM_ADDR_MAX in net/mptcp/pm_netlink.c: `limits set` refuses more
IP_TIMEOUT = 5.0


@dataclass(frozen=True)
class Endpoint:
    address: str
    id: int
    flags: frozenset[str]  # signal, subflow, backup, fullmesh, implicit, ...
    dev: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        words = [self.address, f"id {self.id}", *sorted(self.flags)]
        if self.port:
            words[1:1] = [f"port {self.port}"]
        if self.dev:
            words += ["dev", self.dev]
        return " ".join(words)


@dataclass(frozen=True)
class KernelState:
    """What the kernel says, as read by `read_state()`; None where it could not be read."""

    enabled: int | None  # net.mptcp.enabled; None: no /proc/sys/net/mptcp at all
    socket_errno: int  # 0: an MPTCP socket could be created
    path_manager: str | None  # "kernel", "userspace", ...
    subflows: int | None = None
    add_addr_accepted: int | None = None
    endpoints: tuple[Endpoint, ...] | None = None
    local_addresses: frozenset[str] | None = None
    ip_error: str | None = None  # why limits/endpoints could not be read


@dataclass(frozen=True)
class Finding:
    blocking: bool  # True: this alone prevents extra subflows
    text: str
    fixes: tuple[str, ...] = field(default=())


def _sysctl(name: str) -> str | None:
    try:
        return (SYSCTL_DIR / name).read_text().strip()
    except OSError:
        return None


def _socket_errno() -> int:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, sockets.IPPROTO_MPTCP).close()
    except OSError as exc:
        return exc.errno or errno.EINVAL
    return 0


def _path_manager() -> str | None:
    # `path_manager` (a name) replaced `pm_type` (0 kernel, 1 userspace) in Linux 6.15.
    name = _sysctl("path_manager")
    if name:
        return name
    pm_type = _sysctl("pm_type")
    return {"0": "kernel", "1": "userspace"}.get(pm_type, pm_type) if pm_type else None


def _ip(args: list[str], ip: str) -> str:
    proc = subprocess.run(
        [ip, *args], capture_output=True, text=True, timeout=IP_TIMEOUT, check=False
    )
    if proc.returncode != 0:
        raise OSError(f"'{' '.join([ip, *args])}' failed: {proc.stderr.strip()}")
    return proc.stdout


def parse_limits(text: str) -> dict[str, int]:
    """`ip mptcp limits show` output; iproute2 6.1 prints text even with -j."""
    text = text.strip()
    if text.startswith("{"):
        return {k: int(v) for k, v in json.loads(text).items()}
    words = text.split()
    return {k: int(v) for k, v in zip(words[::2], words[1::2], strict=True)}


def parse_endpoints(text: str) -> tuple[Endpoint, ...]:
    """`ip -j mptcp endpoint show` output (a JSON list; iproute2 6.1 supports it)."""
    endpoints = []
    for entry in json.loads(text or "[]"):
        flags = frozenset(k for k, v in entry.items() if v is True)
        endpoints.append(
            Endpoint(entry["address"], int(entry["id"]), flags, entry.get("dev"), entry.get("port"))
        )
    return tuple(endpoints)


def parse_addresses(text: str) -> frozenset[str]:
    """The local addresses in `ip -j addr show` output, normalised."""
    return frozenset(
        str(ipaddress.ip_address(info["local"]))
        for link in json.loads(text or "[]")
        for info in link.get("addr_info", ())
        if "local" in info
    )


def read_state(ip: str = "ip") -> KernelState:
    """Read MPTCP's state in the current network namespace."""
    enabled_text = _sysctl("enabled")
    state = {
        "enabled": int(enabled_text) if enabled_text is not None else None,
        "socket_errno": _socket_errno(),
        "path_manager": _path_manager(),
    }
    try:
        limits = parse_limits(_ip(["-j", "mptcp", "limits", "show"], ip))
        state["subflows"] = limits.get("subflows")
        state["add_addr_accepted"] = limits.get("add_addr_accepted")
        state["endpoints"] = parse_endpoints(_ip(["-j", "mptcp", "endpoint", "show"], ip))
        state["local_addresses"] = parse_addresses(_ip(["-j", "addr", "show"], ip))
    except (OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
        state["ip_error"] = str(exc) or type(exc).__name__
    return KernelState(**state)


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


def _server(state: KernelState, signal_eps: list[Endpoint]) -> list[Finding]:
    if signal_eps:
        return []
    return [Finding(
        False,
        "as a server, this host announces no address (no endpoint has the signal flag): extra "
        "subflows come only from the client's own subflow endpoints",
        ("ip mptcp endpoint add ADDR2 dev DEV2 signal",),
    )]


def diagnose(state: KernelState, mode: str | None = None) -> list[Finding]:
    """What prevents extra subflows for `mode` ("client", "server", or None for both)."""
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
        findings += _server(state, signal_eps)
    return findings


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
    if state.endpoints is not None:
        lines.append(f"  endpoints:     {len(state.endpoints) or 'none'}")
        lines += [f"    {ep}" for ep in state.endpoints]
    return lines


def format_report(state: KernelState, findings: list[Finding], mode: str | None) -> str:
    """The text `--check` prints."""
    role = f"as a {mode}" if mode else "as client and as server"
    lines = [f"MPTCP check for this network namespace ({role}):", *_describe(state)]
    for title, blocking in (("Problems", True), ("Notes", False)):
        chosen = [f for f in findings if f.blocking is blocking]
        if chosen:
            lines.append(f"{title}:")
        for finding in chosen:
            lines.append(f"  - {finding.text}")  # one line: commands in it stay whole
            # Several fixes are alternatives; a sequence is one fix joined with &&.
            lines += [f"    {'fix:' if i == 0 else ' or:'} {fix}"
                      for i, fix in enumerate(finding.fixes)]
    if any(f.blocking for f in findings):
        lines.append("Result: extra subflows are NOT possible: MPTCP connections use one path.")
    else:
        lines.append("Result: extra subflows are possible.")
    return "\n".join(lines) + "\n"


def run_check(mode: str | None = None, out: TextIO | None = None, ip: str = "ip") -> int:
    """Print the report for this namespace; 0 when extra subflows are possible, else 1."""
    state = read_state(ip)
    log.debug("MPTCP state: %s", state)
    findings = diagnose(state, mode)
    (out or sys.stdout).write(format_report(state, findings, mode))
    return 1 if any(f.blocking for f in findings) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mptcpproxy.check",
        description="Check whether MPTCP can open extra subflows in this network namespace.",
    )
    parser.add_argument("-m", "--mode", choices=("client", "server"),
                        help="judge for this role only (default: both)")
    return run_check(parser.parse_args(argv).mode)


if __name__ == "__main__":
    raise SystemExit(main())
