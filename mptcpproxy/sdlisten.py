"""systemd socket activation: the listening sockets systemd passes (`LISTEN_FDS`).

systemd (or `systemd-socket-activate`) opens the listeners of a `.socket` unit and passes
them as fds 3, 4, ... with `LISTEN_PID` (our pid), `LISTEN_FDS` (how many) and
`LISTEN_FDNAMES` (their `FileDescriptorName=`, colon-separated). systemd keeps its own copy
open across restarts of the service, so connections that arrive while the proxy restarts
wait in the backlog instead of being refused. A listener takes the passed socket whose name
is its `name`, else the one bound to its address and port (see sd_listen_fds(3)).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from mptcpproxy.config import Config, ConfigError, format_hostport

SD_LISTEN_FDS_START = 3
IPPROTO_MPTCP = 262


@dataclass
class Passed:
    """One socket systemd passed."""

    sock: socket.socket
    name: str  # FileDescriptorName= ("unknown" when none was given)
    proto: int  # IPPROTO_TCP or IPPROTO_MPTCP
    used: bool = False

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return format_hostport(host, port)


def take_passed(environ: dict[str, str] | None = None) -> list[Passed]:
    """The sockets passed to this process (none without socket activation); the variables
    are removed so that children (nft, ip) do not believe they were meant for them."""
    env = os.environ if environ is None else environ
    pid, count = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    names = env.get("LISTEN_FDNAMES", "")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    if not count or (pid and pid != str(os.getpid())):
        return []
    try:
        n = int(count)
    except ValueError:
        raise ConfigError(f"LISTEN_FDS={count!r} is not a number of sockets") from None
    labels = names.split(":") if names else []
    passed = []
    for i in range(n):
        fd = SD_LISTEN_FDS_START + i
        name = labels[i] if i < len(labels) and labels[i] else "unknown"
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ConfigError(f"socket activation: fd {fd} ({name}) is not a socket: "
                              f"{exc.strerror}") from None
        os.set_inheritable(fd, False)
        if (sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET,
                                                                   socket.AF_INET6)
                or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
            sock.detach()
            raise ConfigError(f"socket activation: fd {fd} ({name}) is not a listening "
                              "TCP/MPTCP socket: use ListenStream= in the .socket unit")
        # systemd passes the socket as it was made (blocking unless the unit says
        # otherwise): the event loop and the relay workers only ever accept non-blocking
        sock.setblocking(False)
        proto = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
        passed.append(Passed(sock, name, proto))
    return passed


def _binds(passed: Passed, config: Config) -> bool:
    host, port = passed.sock.getsockname()[:2]
    if port != config.port:
        return False
    if config.bind is None:
        return host in ("::", "0.0.0.0")
    return host == config.bind or host == f"::ffff:{config.bind}"


def match(passed: list[Passed], config: Config) -> Passed | None:
    """The passed socket for this listener (by name, else by address), checked to be of
    the protocol it needs; None when systemd passed none for it."""
    chosen = next((p for p in passed if not p.used and p.name == config.name
                   and p.sock.getsockname()[1] == config.port), None)
    if chosen is None:
        chosen = next((p for p in passed if not p.used and _binds(p, config)), None)
    if chosen is None:
        return None
    wanted = IPPROTO_MPTCP if config.listen_mptcp else socket.IPPROTO_TCP
    if chosen.proto != wanted:
        have = "MPTCP" if chosen.proto == IPPROTO_MPTCP else "TCP"
        need = "MPTCP" if wanted == IPPROTO_MPTCP else "TCP"
        fix = ("add SocketProtocol=mptcp to the .socket unit" if need == "MPTCP" else
               "remove SocketProtocol=mptcp from the .socket unit")
        raise ConfigError(f"systemd passed a {have} socket ({chosen.name}, {chosen.address}) "
                          f"for the listener on port {config.port}, which accepts {need}: "
                          f"{fix}")
    chosen.used = True
    return chosen
