"""What the proxy says about each connection: its end, one line (or one JSON object)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Sequence

from mptcpproxy import logsetup, sockets
from mptcpproxy.relay._results import PathStat, Result

log = logging.getLogger("mptcpproxy")


class Conn:
    # Addresses are kept as tuples and formatted only when the connection is logged.
    # `client` is the best known client: an accepted PROXY header's source, whose sender
    # (the peer) is then `via`.
    __slots__ = ("client", "upstream", "mptcp_leg", "via")

    def __init__(self, client: tuple, upstream: tuple, mptcp_leg: bool,
                 via: tuple | None = None) -> None:
        self.client, self.upstream, self.mptcp_leg = client, upstream, mptcp_leg
        self.via = via


def reason(exc: BaseException) -> str:
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve: {exc.strerror}"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


def _host(addr: tuple) -> str:
    return f"[{addr[0]}]" if ":" in addr[0] else addr[0]


def path_amounts(paths: Sequence[PathStat]) -> list[int]:
    """The bytes each subflow's share is taken from, in the direction that carried more:
    those the proxy sent on the MPTCP leg (acknowledged by the peer: bytes its own qdisc
    dropped and sent again count once), or those it received (a download's: its request
    does not decide the split). One pass for the sums: it runs for every end line."""
    sent = received = 0
    for p in paths:
        sent += p.bytes_acked or p.bytes_sent
        received += p.bytes_received
    if sent > received:
        return [p.bytes_acked or p.bytes_sent for p in paths]
    return [p.bytes_received for p in paths]


_path_names: dict[tuple, str] = {}  # (is a subflow, local host, remote host) -> its name


def path_name(p: PathStat) -> str:
    """A path as the end line names it: "LOCAL>REMOTE" (hosts only, so a few names serve
    every connection: kept, a cache), or "closed subflows" for the id-0 entry."""
    key = (p.id != 0, p.local[0], p.remote[0])
    name = _path_names.get(key)
    if name is None:
        if len(_path_names) >= 4096:  # bounded, whatever the addresses
            _path_names.clear()
        name = _path_names[key] = (f"{_host(p.local)}>{_host(p.remote)}" if p.id
                                   else "closed subflows")
    return name


def percent(n: int, total: int) -> int:
    """round(100 * n / total), halves to even, exact for any counts (the engine's C twin
    of this rule, relay/_relay_pathlist.pxi, gives the same)."""
    q, r = divmod(100 * n, total)
    return q + (2 * r > total or (2 * r == total and q & 1))


def path_shares(paths: Sequence[PathStat]) -> list[tuple[str, int]]:
    """(path, percent) per subflow, of its path_amounts(). The id-0 entry is "closed
    subflows"."""
    amounts = path_amounts(paths)
    total = sum(amounts) or 1
    return [(path_name(p), percent(n, total)) for p, n in zip(paths, amounts, strict=True)]


def paths_text(paths: Sequence[PathStat]) -> str:
    """The end line's paths= value: "PATH N%" per subflow, of path_shares(), without a
    "closed subflows" entry at 0 % (after both DATA_FINs the kernel may close the subflows
    before the last sample: the DATA_FIN's acknowledgement lands there, one byte). The
    compiled engine's Result.paths formats it itself, by the same rule (PathList.text)."""
    text = getattr(paths, "text", None)
    if text is None:
        shares = path_shares(paths)
        text = ",".join(f"{name} {n}%" for p, (name, n) in zip(paths, shares, strict=True)
                        if p.id or n)
    return text


def path_fields(p: PathStat) -> dict:
    """One path as the JSON log and /connections give it."""
    return {"id": p.id, "local": sockets.peer_name(p.local) if p.id else None,
            "remote": sockets.peer_name(p.remote) if p.id else None,
            "bytes_sent": p.bytes_sent, "bytes_received": p.bytes_received,
            "bytes_retrans": p.bytes_retrans, "bytes_acked": p.bytes_acked,
            "rtt_us": p.rtt_us, "closed": p.closed}


def log_end(r: Result, conn: Conn) -> None:
    """The line for a finished pair: how it ended, the bytes, and whether MPTCP was used."""
    if log.isEnabledFor(logging.INFO):
        msg, extra = end_line(r, conn)
        log.info("%s", msg, extra=extra)


def log_ends(ends: Sequence[tuple[Result, Conn]]) -> None:
    """The lines for many finished pairs, in order, written at once where the logging
    set-up allows it (logsetup.line_writer): a line each, as log_end() writes it."""
    if not ends or not log.isEnabledFor(logging.INFO):
        return
    write = logsetup.line_writer(log)
    if write is None:
        for r, conn in ends:
            log_end(r, conn)
    else:
        fields = write.fields  # type: ignore[attr-defined]
        write([end_line(r, conn, fields) for r, conn in ends])


def end_line(r: Result, conn: Conn, fields: bool = True) -> tuple[str, dict]:
    """A finished pair's message and its fields (the JSON format's keys; {} when `fields`
    is false: a text log, which needs only the message, saves building them)."""
    how = r.reason
    if r.errno:
        how += f" ({os.strerror(r.errno).lower()})"
    if not conn.mptcp_leg:
        mptcp = "mptcp=off"
    elif r.is_mptcp:
        mptcp = f"mptcp=yes subflows={r.subflows}"
        text = paths_text(r.paths) if r.paths else ""
        if text:
            mptcp += " paths=" + text
    else:
        mptcp = "mptcp=no (fell back to TCP)"
    client, upstream = sockets.peer_name(conn.client), sockets.peer_name(conn.upstream)
    via = sockets.peer_name(conn.via) if conn.via else None
    msg = (f"conn {r.conn_id} {how}: client {client}{f' via {via}' if via else ''} upstream "
           f"{upstream} sent {r.bytes_ab} B received {r.bytes_ba} B in {r.duration:.3f} s, "
           f"{mptcp}")
    if not fields:
        return msg, {}
    return msg, {"event": "conn_end", "conn_id": r.conn_id, "client": client, "via": via,
                 "upstream": upstream, "reason": r.reason, "errno": r.errno,
                 "bytes_client_to_upstream": r.bytes_ab,
                 "bytes_upstream_to_client": r.bytes_ba, "duration_s": round(r.duration, 3),
                 "mptcp": r.is_mptcp if conn.mptcp_leg else None, "subflows": r.subflows,
                 "paths": [path_fields(p) for p in r.paths],
                 "mptcp_bytes_sent": r.mptcp_bytes_sent,
                 "mptcp_bytes_received": r.mptcp_bytes_received,
                 "mptcp_bytes_retrans": r.mptcp_bytes_retrans}
