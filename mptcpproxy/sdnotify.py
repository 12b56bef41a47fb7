"""systemd's readiness protocol without a dependency: one datagram to $NOTIFY_SOCKET.

The control plane sends `READY=1` once it listens, `STOPPING=1` when it starts to
drain, and may send `STATUS=...` lines (shown by `systemctl status`). Outside systemd
(no $NOTIFY_SOCKET) every call is a no-op that returns False.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def _address(name: str) -> str | bytes | None:
    if name.startswith("@"):  # an abstract socket: "@" stands for the leading NUL
        return b"\0" + name[1:].encode()
    if name.startswith("/"):
        return name
    return None  # vsock:... and other kinds: not supported (systemd uses a path here)


def sd_notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1", or "STATUS=...\\nREADY=1") to systemd.

    Returns True when sent; False outside systemd or when it could not be sent (logged).
    Never blocks: a full receive queue counts as not sent.
    """
    name = os.environ.get("NOTIFY_SOCKET")
    if not name:
        return False
    address = _address(name)
    if address is None:
        log.warning("NOTIFY_SOCKET=%s is not a unix socket; systemd is not notified", name)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd (%s) at %s: %s", state.split("\n")[0], name,
                    exc.strerror or exc)
        return False
    return True
