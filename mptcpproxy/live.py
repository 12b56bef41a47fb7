"""The live view: what `GET /connections` answers, built on the control plane from what the
relay workers last published (Relay.connections(), about a second old) and the
control plane's own records. Nothing here calls into a pair or waits for a worker.

The document (JSON)::

    {"connections": [{"id", "listener", "state", "client", "via", "upstream", "age_s",
                      "bytes_client_to_upstream", "bytes_upstream_to_client", "mptcp",
                      "subflows", "mptcp_bytes_sent", "mptcp_bytes_received",
                      "mptcp_bytes_retrans", "paths": [{"id", "local", "remote",
                      "bytes_sent", "bytes_received", "bytes_retrans", "bytes_acked",
                      "rtt_us", "closed", "share"}]}],
     "locals": [{"address", "paths", "bytes_sent", "bytes_received", "bytes_retrans",
                 "bytes_acked", "share"}]}

`state` is "relaying", or "connecting" for a client whose upstream connection is still being
made (then mptcp and the byte counts are null, and age_s too when the control plane makes
it).
`mptcp` is true, false (the MPTCP leg fell back to TCP) or null (no MPTCP leg:
--disable-mptcp), as in the JSON log line. A path's fields are those of the JSON log line
(connlog.path_fields); `share` is the percentage of the connection's bytes that path
carried, as the end line counts it (connlog.path_shares): of those the proxy sent on the
MPTCP leg (acknowledged), or of those it received when it received more. `locals` sums the
paths of the open connections per local address, with each address's share of them all
(each connection's paths counted as for its own shares).
A path with id 0 is no subflow: it holds the bytes of closed subflows the samples missed
(local and remote null, address null in `locals`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from mptcpproxy.connlog import Conn, path_amounts, path_fields, path_shares
from mptcpproxy.sockets import peer_name

RELAYING, CONNECTING = "relaying", "connecting"


def _host(addr: tuple) -> str:
    host = addr[0]
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def _name(addr: tuple | None) -> str | None:
    return None if addr is None else peer_name(addr)


def _paths(stat) -> list[dict[str, Any]]:
    return [{**path_fields(p), "share": share}
            for p, (_, share) in zip(stat.paths, path_shares(stat.paths), strict=True)]


def relaying(stat, listener: str | None, conn: Conn | None, mptcp_leg: bool
             ) -> dict[str, Any]:
    """One open pair: its ConnStat, its listener's title, the control plane's record of it
    (None for a pair the relay accepted itself) and whether it has an MPTCP leg."""
    client, via, upstream = stat.client, None, stat.upstream
    if conn is not None:  # the control plane knows better: a PROXY header's client
        client, via, upstream = conn.client, conn.via, conn.upstream or upstream
    # a pair the relay accepted itself and is still connecting upstream
    if stat.connecting:
        row = connecting(stat.conn_id, listener, client, via, _name(upstream))
        row["age_s"] = round(stat.age, 3)
        return row
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


def connecting(conn_id: int, listener: str | None, client: tuple | None, via: tuple | None,
               upstream: str | None) -> dict[str, Any]:
    """A client whose upstream connection is still being made (`upstream`: the target)."""
    return {
        "id": conn_id, "listener": listener, "state": CONNECTING,
        "client": _name(client), "via": _name(via), "upstream": upstream, "age_s": None,
        "bytes_client_to_upstream": None, "bytes_upstream_to_client": None,
        "mptcp": None, "subflows": 0,  # not known before the connection is made
        "mptcp_bytes_sent": 0, "mptcp_bytes_received": 0, "mptcp_bytes_retrans": 0,
        "paths": [],
    }


def locals_of(stats: Iterable) -> list[dict[str, Any]]:
    """The paths of these ConnStats summed per local address, sorted by address, with each
    address's share: each connection's paths count as its end line counts them
    (connlog.path_amounts: what it sent, or received when it received more), so a server
    proxy's few bytes sent on one connection do not decide how its received bytes are
    shared. The bytes of closed subflows the samples missed (PathStat id 0) last, as
    address null."""
    sums: dict[str | None, list[int]] = {}
    for stat in stats:
        for p, amount in zip(stat.paths, path_amounts(stat.paths), strict=True):
            row = sums.setdefault(_host(p.local) if p.id else None, [0] * 6)
            for i, n in enumerate((1, p.bytes_sent, p.bytes_received, p.bytes_retrans,
                                   p.bytes_acked, amount)):
                row[i] += n
    hosts = sorted(sums, key=lambda k: (k is None, k or ""))
    total = sum(sums[host][5] for host in hosts) or 1
    return [{"address": host, "paths": sums[host][0], "bytes_sent": sums[host][1],
             "bytes_received": sums[host][2], "bytes_retrans": sums[host][3],
             "bytes_acked": sums[host][4], "share": round(100 * sums[host][5] / total)}
            for host in hosts]


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
                origin.via if origin else None, str(attempt.target)))
    rows.sort(key=lambda row: row["id"])
    return {"connections": rows, "locals": locals_of(stats)}
