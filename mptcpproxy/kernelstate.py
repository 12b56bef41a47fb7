"""MPTCP's state in this network namespace, as `read_state()` reads it for `--check`.

The `net.mptcp.*` sysctls, whether an MPTCP socket can be created, the in-kernel path
manager's limits and endpoints and the local addresses, read with `ip` (iproute2) and
parsed from what iproute2 6.1 prints, and the kernel's MPTCP counters (`MPTcpExt` in
/proc/net/netstat, which is the reading process's namespace's).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mptcpproxy import sockets

SYSCTL_DIR = Path("/proc/sys/net/mptcp")
NETSTAT = Path("/proc/net/netstat")
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
    # 0: the C flag, clients may not join the address they connected to; None: older kernel
    allow_join_initial_addr_port: int | None = None
    # MPTcpExt counters since the namespace was made (MPJoinSynTx, MPJoinNoTokenFound, ...)
    counters: Mapping[str, int] | None = None
    checksum_enabled: int | None = None  # net.mptcp.checksum_enabled (DSS checksums)


def parse_netstat(text: str, section: str = "MPTcpExt") -> dict[str, int]:
    """One section of /proc/net/netstat: a line of names, then a line of values, each
    starting with "Section:". Names are read, not assumed: kernels add counters."""
    rows = [line.split()[1:] for line in text.splitlines()
            if line.startswith(f"{section}:")]
    if len(rows) < 2:
        return {}
    return {name: int(value) for name, value in zip(rows[0], rows[1], strict=False)}


def read_counters(path: Path | str = NETSTAT) -> dict[str, int] | None:
    """The MPTcpExt counters of this network namespace; None when they cannot be read."""
    try:
        with open(path) as f:
            return parse_netstat(f.read()) or None
    except (OSError, ValueError):
        return None


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


def _int_sysctl(name: str) -> int | None:
    text = _sysctl(name)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _ip(args: list[str], ip: str, timeout: float = IP_TIMEOUT) -> str:
    proc = subprocess.run(
        [ip, *args], capture_output=True, text=True, timeout=timeout, check=False
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


def read_state(ip: str = "ip", timeout: float = IP_TIMEOUT) -> KernelState:
    """Read MPTCP's state in the current network namespace."""
    state = {
        "enabled": _int_sysctl("enabled"),
        "socket_errno": _socket_errno(),
        "path_manager": _path_manager(),
        "allow_join_initial_addr_port": _int_sysctl("allow_join_initial_addr_port"),
        "counters": read_counters(),
        "checksum_enabled": _int_sysctl("checksum_enabled"),
    }
    try:
        limits = parse_limits(_ip(["-j", "mptcp", "limits", "show"], ip, timeout))
        state["subflows"] = limits.get("subflows")
        state["add_addr_accepted"] = limits.get("add_addr_accepted")
        state["endpoints"] = parse_endpoints(
            _ip(["-j", "mptcp", "endpoint", "show"], ip, timeout))
        state["local_addresses"] = parse_addresses(_ip(["-j", "addr", "show"], ip, timeout))
    except (OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
        state["ip_error"] = str(exc) or type(exc).__name__
    return KernelState(**state)
