"""Socket creation and MPTCP facts: availability, listeners, upstream sockets, status."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket

from mptcpproxy.config import format_hostport

IPPROTO_MPTCP = getattr(socket, "IPPROTO_MPTCP", 262)
SOL_MPTCP = 284
MPTCP_INFO = 1
TCP_IS_MPTCP = 43
SO_MARK = getattr(socket, "SO_MARK", 36)
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = 75

_MPTCP_REFUSALS = {
    errno.ENOPROTOOPT: "MPTCP is disabled in the kernel (net.mptcp.enabled=0): enable it with "
    "'sysctl -w net.mptcp.enabled=1', or run with --disable-mptcp",
    errno.EPROTONOSUPPORT: "this kernel was built without MPTCP (CONFIG_MPTCP): use a kernel "
    "with MPTCP (5.6 or newer), or run with --disable-mptcp",
    errno.EINVAL: "this kernel does not know MPTCP sockets (it needs Linux 5.6 or newer): "
    "upgrade the kernel, or run with --disable-mptcp",
}


def mptcp_refusal(err: int) -> str:
    """A sentence for a person on why the kernel refused an MPTCP socket."""
    return _MPTCP_REFUSALS.get(
        err, f"the kernel refused an MPTCP socket ({errno.errorcode.get(err, err)}: "
        f"{os.strerror(err)}); run with --disable-mptcp to use plain TCP"
    )


def mptcp_unavailable() -> str | None:
    """None when this network namespace's kernel accepts MPTCP sockets, else why not."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP).close()
    except OSError as exc:
        return mptcp_refusal(exc.errno or 0)
    return None


def stream_socket(family: int, mptcp: bool, mark: int = 0) -> socket.socket:
    """A non-blocking stream socket, MPTCP or TCP; `mark` sets SO_MARK (needs
    CAP_NET_ADMIN) so firewall rules can tell the proxy's own connections apart."""
    sock = socket.socket(family, socket.SOCK_STREAM, IPPROTO_MPTCP if mptcp else 0)
    try:
        sock.setblocking(False)
        if mark:
            # on an MPTCP socket the kernel copies it to every subflow
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    except BaseException:
        sock.close()
        raise
    return sock


def make_listener(
    bind: str | None, port: int, mptcp: bool, backlog: int, transparent: bool = False
) -> socket.socket:
    """A listening socket; `bind=None` means dual-stack `::`, or `0.0.0.0` without IPv6.

    `transparent` sets IP_TRANSPARENT / IPV6_TRANSPARENT (TPROXY; needs CAP_NET_ADMIN).
    Raises OSError from setsockopt/bind/listen unchanged; the caller words it.
    """
    if bind is None:
        try:
            return _listen(socket.AF_INET6, "::", port, mptcp, backlog, dual_stack=True,
                           transparent=transparent)
        except OSError as exc:
            # No IPv6 in this kernel or namespace (disabled, or no address family).
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise
        bind = "0.0.0.0"
    family = socket.AF_INET6 if ipaddress.ip_address(bind).version == 6 else socket.AF_INET
    return _listen(family, bind, port, mptcp, backlog, dual_stack=False,
                   transparent=transparent)


def _listen(
    family: int, host: str, port: int, mptcp: bool, backlog: int, dual_stack: bool,
    transparent: bool = False,
) -> socket.socket:
    sock = stream_socket(family, mptcp)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
        # Several processes may listen on the port at once, so that a new one takes over
        # while the old one drains (a restart that refuses nothing; docs/operating.md).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if transparent:
            set_transparent(sock)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def other_listeners(sock: socket.socket) -> int:
    """How many listening sockets of this network namespace would take `sock`'s clients
    once it closes, itself not counted: a successor started beside it (SO_REUSEPORT) shows
    here. One on the same port but another address does not (unless it is a wildcard).
    MPTCP listeners are listed too (their TCP subflow carries the socket's inode)."""
    port = f":{sock.getsockname()[1]:04X}"
    own = str(os.fstat(sock.fileno()).st_ino)
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows += [row.split() for row in f.read().splitlines()[1:]]
        except OSError:
            continue
    listening = [(cols[1].rpartition(":")[0], cols[9]) for cols in rows
                 if len(cols) > 9 and cols[1].endswith(port) and cols[3] == "0A"
                 and cols[9] != "0"]
    mine = {addr for addr, inode in listening if inode == own}
    return sum(1 for addr, inode in listening if inode != own and (
        addr in mine or not addr.strip("0") or not mine))


def set_transparent(sock: socket.socket) -> None:
    """IP_TRANSPARENT / IPV6_TRANSPARENT: TPROXY hands this listener connections for
    addresses that are not ours (needs CAP_NET_ADMIN; raises OSError)."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)


def bind_transparent(sock: socket.socket, family: int, host: str) -> None:
    """Bind an upstream socket to `host`, an address of another host (--source client):
    IP_TRANSPARENT / IPV6_TRANSPARENT (CAP_NET_ADMIN), port 0 so the kernel picks one.
    Raises OSError, EAFNOSUPPORT when `host` is not of the socket's family."""
    if (":" in host) != (family == socket.AF_INET6):
        raise OSError(errno.EAFNOSUPPORT, f"the client's address {host} and the upstream "
                      "address are of different IP versions")
    set_transparent(sock)
    sock.bind((host, 0))


def set_nodelay(sock: socket.socket) -> None:
    # A relay must not add Nagle's delay on top of the application's own choice.
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def peer_name(addr: tuple) -> str:
    """`host:port` for a socket address, IPv4-mapped IPv6 shown as plain IPv4."""
    host, port = addr[0], addr[1]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return format_hostport(host, port)
