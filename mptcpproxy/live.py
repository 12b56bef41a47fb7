"""The live view: what `GET /connections` answers, built on the control plane from what the
relay workers last published (Relay.connections(), at most about a second old) and the
control plane's own records. Nothing here calls into a pair or waits for a worker.

The document (JSON)::

    {"connections": [{"id", "listener", "state", "client", "via", "upstream", "age_s",
                      "bytes_client_to_upstream", "bytes_upstream_to_client", "mptcp",
                      "subflows", "mptcp_bytes_sent", "mptcp_bytes_received",
                      "mptcp_bytes_retrans", "paths": [{"id", "local", "remote",
                      "bytes_sent", "bytes_received", "bytes_retrans", "rtt_us", "closed",
                      "share"}]}],
     "locals": [{"address", "paths", "bytes_sent", "bytes_received", "bytes_retrans",
                 "share"}]}

`state` is "relaying", or "connecting" for a client whose upstream connection the control
plane is still making (then age_s and the byte counts are null). `mptcp` is true, false (the
MPTCP leg fell back to TCP) or null (no MPTCP leg: --disable-mptcp), as in the JSON log
line. `share` is the percentage of the connection's bytes that path carried: of those the
proxy sent on the MPTCP leg, or of those it received when it sent none. `locals` sums the
paths of the open connections per local address, with each address's share of them all.
A path with id 0 is no subflow: it holds the bytes of closed subflows the samples missed
(local and remote null, address null in `locals`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mptcpproxy.connlog import Conn
from mptcpproxy.sockets import peer_name

RELAYING, CONNECTING = "relaying", "connecting"


def _host(addr: tuple) -> str:
    host = addr[0]
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def _name(addr: tuple | None) -> str | None:
    return None if addr is None else peer_name(addr)


def shares(counts: Sequence[tuple[int, int]]) -> list[float]:
    """Each path's percentage of the bytes sent on them, or received when none were sent
    (one decimal; all 0.0 when no byte moved). `counts`: (bytes sent, received) per path."""
    sent = [c[0] for c in counts]
    counts = sent if any(sent) else [c[1] for c in counts]
    total = sum(counts)
    return [round(100.0 * n / total, 1) if total else 0.0 for n in counts]


def _paths(stat) -> list[dict[str, Any]]:
    # id 0 is no subflow but the bytes of closed ones the samples missed: no addresses
    return [{"id": p.id, "local": _name(p.local) if p.id else None,
             "remote": _name(p.remote) if p.id else None,
             "bytes_sent": p.bytes_sent, "bytes_received": p.bytes_received,
             "bytes_retrans": p.bytes_retrans, "rtt_us": p.rtt_us, "closed": bool(p.closed),
             "share": share}
            for p, share in zip(stat.paths, shares(
                [(p.bytes_sent, p.bytes_received) for p in stat.paths]), strict=True)]


def relaying(stat, listener: str | None, conn: Conn | None, mptcp_leg: bool
             ) -> dict[str, Any]:
    """One open pair: its ConnStat, its listener's title, the control plane's record of it
    (None for a pair the relay accepted itself) and whether it has an MPTCP leg."""
    client, via, upstream = stat.client, None, stat.upstream
    if conn is not None:  # the control plane knows better: a PROXY header's client
        client, via, upstream = conn.client, conn.via, conn.upstream or upstream
    return {
        "id": stat.conn_id, "listener": listener, "state": RELAYING,
        "client": _name(client), "via": _name(via), "upstream": _name(upstream),
        "age_s": round(stat.age, 3),
        "bytes_client_to_upstream": stat.bytes_ab, "bytes_upstream_to_client": stat.bytes_ba,
        "mptcp": bool(stat.is_mptcp) if mptcp_leg else None,
        "subflows": stat.subflows,
        "mptcp_bytes_sent": stat.mptcp_bytes_sent,
        "mptcp_bytes_received": stat.mptcp_bytes_received,
        "mptcp_bytes_retrans": stat.mptcp_bytes_retrans,
        "paths": _paths(stat),
    }


def connecting(conn_id: int, listener: str, client: tuple | None, via: tuple | None,
               upstream: str, mptcp_leg: bool) -> dict[str, Any]:
    """A client whose upstream connection is still being made (`upstream`: the target)."""
    return {
        "id": conn_id, "listener": listener, "state": CONNECTING,
        "client": _name(client), "via": _name(via), "upstream": upstream, "age_s": None,
        "bytes_client_to_upstream": None, "bytes_upstream_to_client": None,
        "mptcp": None if not mptcp_leg else False, "subflows": 0,
        "mptcp_bytes_sent": 0, "mptcp_bytes_received": 0, "mptcp_bytes_retrans": 0,
        "paths": [],
    }


def locals_of(stats: Iterable) -> list[dict[str, Any]]:
    """The paths of these ConnStats summed per local address, sorted by address; the bytes
    of closed subflows the samples missed (PathStat id 0) last, as address null."""
    out: dict[str | None, dict[str, Any]] = {}
    for stat in stats:
        for p in stat.paths:
            host = _host(p.local) if p.id else None
            row = out.setdefault(host, {"address": host, "paths": 0, "bytes_sent": 0,
                                        "bytes_received": 0, "bytes_retrans": 0})
            row["paths"] += 1
            for key in ("bytes_sent", "bytes_received", "bytes_retrans"):
                row[key] += getattr(p, key)
    rows = [out[k] for k in sorted(out, key=lambda k: (k is None, k or ""))]
    both = [(row["bytes_sent"], row["bytes_received"]) for row in rows]
    for row, share in zip(rows, shares(both), strict=True):
        row["share"] = share
    return rows


def document(proxy) -> dict[str, Any]:
    """The `/connections` document of a control.Proxy: its relay's open pairs, then the
    clients its listeners are still connecting upstream."""
    stats = proxy.relay.connections() if proxy.relay is not None else []
    by_tag: Mapping[int, Any] = proxy.by_tag
    conns: Mapping[int, Conn] = proxy.conns
    rows = []
    for stat in stats:
        lst, conn = by_tag.get(stat.tag), conns.get(stat.conn_id)
        mptcp_leg = (conn.mptcp_leg if conn is not None else
                     lst is not None and not lst.config.disable_mptcp)
        rows.append(relaying(stat, lst.title if lst is not None else None, conn, mptcp_leg))
    for lst in proxy.all_listeners:
        for attempt in list(lst.connecting):
            origin = attempt.origin
            rows.append(connecting(
                attempt.conn_id, lst.title, origin.client if origin else attempt.addr,
                origin.via if origin else None, str(attempt.target),
                not lst.config.disable_mptcp))
    rows.sort(key=lambda row: row["id"])
    return {"connections": rows, "locals": locals_of(stats)}
