"""Transparent mode: where an intercepted connection was going, and whether to relay it.

REDIRECT rewrites the destination; it is read back with `SO_ORIGINAL_DST` (IPv4:
SOL_IP, IPv6: SOL_IPV6, both option 80) or, on an accepted MPTCP socket where that
getsockopt fails with EOPNOTSUPP, from conntrack (see `mptcpproxy.conntrack`). TPROXY
leaves the destination alone: the accepted socket's own address is the original one.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable

from mptcpproxy import conntrack
from mptcpproxy.config import HostPort, format_hostport

log = logging.getLogger("mptcpproxy")

REDIRECT, TPROXY = "redirect", "tproxy"
METHODS = (REDIRECT, TPROXY)
SO_ORIGINAL_DST = 80  # also IP6T_SO_ORIGINAL_DST, at SOL_IPV6
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)

Address = tuple[str, int]


class Refused(Exception):
    """This connection must not be relayed; the message says why, in one sentence."""


def plain(addr: tuple) -> Address:
    """(host, port) of a socket address, IPv4-mapped IPv6 shown as IPv4, no scope."""
    host = addr[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, addr[1]


def so_original_dst(sock: socket.socket) -> Address | None:
    """The pre-REDIRECT destination of an accepted TCP socket; None without a conntrack
    entry. Raises OSError (EOPNOTSUPP on an MPTCP socket, for one)."""
    ipv4 = ":" not in plain(sock.getpeername())[0]
    try:
        if ipv4:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, packed = struct.unpack_from(">H4s", raw, 2)
        else:
            raw = sock.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, 28)
            port, packed = struct.unpack_from(">H4x16s", raw, 2)
    except OSError as exc:
        if exc.errno == errno.ENOENT:  # no conntrack entry: nothing was rewritten
            return None
        raise
    return str(ipaddress.ip_address(packed)), port


def redirect_original_dst(sock: socket.socket) -> Address | None:
    """SO_ORIGINAL_DST, or the conntrack entry of the first subflow on an MPTCP socket."""
    try:
        return so_original_dst(sock)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOPROTOOPT):
            raise
    # an accepted MPTCP socket: its addresses are those of the first subflow (post-NAT)
    return conntrack.original_dst_by_reply(plain(sock.getsockname()), plain(sock.getpeername()))


def is_local_address(host: str) -> bool:
    """Whether `host` is an address of this network namespace (a bind() to it works)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((host, 0))
    except OSError:
        return False
    return True


def decide(
    original: Address | None,
    local: Address,
    listen_port: int,
    fallback: HostPort | None,
    is_local: Callable[[str], bool] = is_local_address,
) -> HostPort:
    """Where to relay a connection accepted in transparent mode.

    `original` is its original destination (None when conntrack has no entry: nothing
    was rewritten); with TPROXY it equals `local`. A destination that is this host's own
    listener came straight to the proxy, not through an interception rule: it goes to
    `fallback` (-r) when given, else it is refused, since relaying it would reach this
    proxy again. A connection rewritten from there to here is a loop and always refused.
    """
    if original is None:
        original = local
    own = original[1] == listen_port and is_local(original[0])
    if own and original != local:
        raise Refused(
            f"its original destination {format_hostport(*original)} is this proxy's own "
            "listener (a loop): exclude the proxy's port from the interception rules"
        )
    if own:
        if fallback is not None:
            return fallback
        raise Refused(
            f"it came straight to the listener {format_hostport(*original)}, not through an "
            "interception rule, and without -r relaying it would loop back to this proxy"
        )
    return HostPort(original[0], original[1])


class Transparent:
    """Per-proxy transparent-mode decisions: `target_for(accepted socket)`."""

    def __init__(self, method: str, listen_port: int, fallback: HostPort | None) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown transparent method {method!r}")
        self.method = method
        self.listen_port = listen_port
        self.fallback = fallback

    def original_destination(self, sock: socket.socket) -> Address | None:
        if self.method == TPROXY:
            return plain(sock.getsockname())
        return redirect_original_dst(sock)

    def target_for(self, sock: socket.socket) -> HostPort:
        """The upstream target for an accepted socket; raises Refused or OSError."""
        local = plain(sock.getsockname())
        original = self.original_destination(sock)
        if original is not None:
            original = plain(original)
        return decide(original, local, self.listen_port, self.fallback)
