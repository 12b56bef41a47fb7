"""`mptcp-proxy --connections HOST:PORT`: the open connections of the proxy whose --metrics
server listens there, read from its `/connections` (live.py) and printed as a table, like
`ss` but per proxied connection: one line per connection, one indented line per path (MPTCP
subflow), then the totals per local address. `--json` prints the document as it came."""

from __future__ import annotations

import http.client
import json
import socket
import sys
import time
from typing import Any, TextIO

from mptcpproxy.config import HostPort

TIMEOUT = 5.0  # seconds for the whole answer, connecting included
MAX_BODY = 64 << 20  # bytes: a proxy with very many connections, not an endless stream

_CONN_HEAD = ("Conn", "Listener", "State", "Age", "Client", "Upstream", "Client>Up",
              "Up>Client", "MPTCP")
CLOSED_SUBFLOWS = "closed subflows"  # a path with id 0: bytes the samples missed
_LOCAL_HEAD = ("Local address", "Paths", "Share", "Sent", "Received", "Retransmitted")


class ViewError(Exception):
    """The view cannot be shown; the message is one sentence for a person."""


def fetch(target: HostPort, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The `/connections` document of the proxy at `target`, asked directly (never through
    an HTTP proxy of the environment, no redirect followed) and whole within `timeout`
    seconds; raises ViewError."""
    url = f"http://{target}/connections"
    try:
        status, body = _get(target, "/connections", time.monotonic() + timeout)
    except TimeoutError:
        raise ViewError(f"{url} did not answer within {timeout:g} s: is {target} an "
                        "mptcp-proxy --metrics address?") from None
    except http.client.HTTPException:  # a bad status line, a body cut short
        raise ViewError(f"{url} did not answer in HTTP: is {target} an mptcp-proxy --metrics "
                        "address?") from None
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise ViewError(f"cannot read {url}: {why.lower()} (is an mptcp-proxy running "
                        f"with --metrics {target}?)") from None
    if status == 404:
        raise ViewError(f"{url} answered 404: is {target} the --metrics address of an "
                        "mptcp-proxy with the live view?")
    if status != 200:
        raise ViewError(f"{url} answered {status} {http.client.responses.get(status, '')}"
                        .rstrip())
    try:
        if len(body) > MAX_BODY:
            raise ValueError("too long")
        doc = json.loads(body)
        if not isinstance(doc, dict) or not isinstance(doc.get("connections"), list):
            raise ValueError("not the connections document")
    except (ValueError, RecursionError):  # RecursionError: nested deeper than it can parse
        raise ViewError(f"{url} did not answer with the open connections (JSON): is {target} "
                        "an mptcp-proxy --metrics address?") from None
    return doc


class _DeadlineSocket(socket.socket):
    """A socket whose every read ends by `deadline` (time.monotonic()): http.client reads
    the head line by line, and a server trickling it must not keep us for ever."""

    deadline = 0.0

    def recv_into(self, buffer, nbytes=0, flags=0):  # type: ignore[no-untyped-def]
        self.settimeout(_left(self.deadline))
        return super().recv_into(buffer, nbytes, flags)


def _left(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    return remaining


def _get(target: HostPort, path: str, deadline: float) -> tuple[int, bytes]:
    """GET `path` from target: (status, body) by `deadline` (time.monotonic()), else
    TimeoutError."""
    conn = http.client.HTTPConnection(target.host, target.port, timeout=_left(deadline))
    try:
        conn.connect()
        sock = _DeadlineSocket(fileno=conn.sock.detach())
        sock.deadline, conn.sock = deadline, sock
        sock.settimeout(_left(deadline))
        conn.request("GET", path, headers={"Accept": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read(MAX_BODY + 1)
    finally:
        conn.close()


def _safe(value: object) -> str:
    # Addresses and names are printed to a terminal: no control character gets through.
    text = "-" if value is None else str(value)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def human_bytes(n: int | None) -> str:
    """1234567 -> '1.2 MB' (SI units, as the status page shows them)."""
    if n is None:
        return "-"
    value, unit = float(n), 0
    units = ("B", "kB", "MB", "GB", "TB")
    while value >= 1000 and unit < len(units) - 1:
        value, unit = value / 1000, unit + 1
    return f"{int(value)} B" if unit == 0 else f"{value:.1f} {units[unit]}"


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def _mptcp(c: dict[str, Any]) -> str:
    if c.get("state") == "connecting" or c.get("mptcp") is None:
        return "-" if c.get("state") == "connecting" else "off"
    if not c["mptcp"]:
        return "no (fell back to TCP)"
    n = c.get("subflows", 0)
    return f"yes, {n} subflow{'' if n == 1 else 's'}"


def _share(row: dict[str, Any]) -> str:
    return f"{round(float(row.get('share') or 0))}%"


def _aligned(rows: list[tuple[str, ...]], indent: str = "") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def _path_row(p: dict[str, Any]) -> tuple[str, ...]:
    route = (f"{_safe(p.get('local'))} > {_safe(p.get('remote'))}" if p.get("id") else
             CLOSED_SUBFLOWS)
    return (route,
            _share(p),
            f"sent {human_bytes(p.get('bytes_sent'))}",
            f"acked {human_bytes(p.get('bytes_acked'))}",
            f"received {human_bytes(p.get('bytes_received'))}",
            f"retrans {human_bytes(p.get('bytes_retrans'))}",
            f"rtt {(p.get('rtt_us') or 0) / 1000:.1f}ms",
            "closed" if p.get("closed") else "")


def table(doc: dict[str, Any]) -> str:
    """The document as text: the connections, each with its paths, then the locals."""
    conns = doc.get("connections") or []
    if not conns:
        return "no open connections\n"
    rows = [_CONN_HEAD]
    for c in conns:
        client = _safe(c.get("client")) + (f" via {_safe(c['via'])}" if c.get("via") else "")
        rows.append((_safe(c.get("id")), _safe(c.get("listener")), _safe(c.get("state")),
                     human_age(c.get("age_s")), client, _safe(c.get("upstream")),
                     human_bytes(c.get("bytes_client_to_upstream")),
                     human_bytes(c.get("bytes_upstream_to_client")), _mptcp(c)))
    conn_lines = _aligned(rows)
    # every path line aligned with the others, indented under its connection
    path_rows = [[_path_row(p) for p in c.get("paths") or []] for c in conns]
    flat = [row for rows_ in path_rows for row in rows_]
    path_lines = iter(_aligned(flat, "    ") if flat else [])
    out = [conn_lines[0]]
    for line, paths in zip(conn_lines[1:], path_rows, strict=True):
        out.append(line)
        out.extend(next(path_lines) for _ in paths)
    locs = doc.get("locals") or []
    if locs:
        out.append("")
        out.extend(_aligned([_LOCAL_HEAD, *[
            (_safe(x.get("address") or CLOSED_SUBFLOWS), _safe(x.get("paths")), _share(x),
             human_bytes(x.get("bytes_sent")), human_bytes(x.get("bytes_received")),
             human_bytes(x.get("bytes_retrans")))
            for x in locs]]))
    return "\n".join(out) + "\n"


def run(target: HostPort, as_json: bool = False, out: TextIO | None = None,
        err: TextIO | None = None, prog: str = "mptcp-proxy") -> int:
    """Print the open connections of the proxy at `target`; 0, or 1 when it cannot."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        doc = fetch(target)
        text = json.dumps(doc, indent=2) + "\n" if as_json else _table_of(target, doc)
    except ViewError as exc:
        print(f"{prog}: error: {exc}", file=err)
        return 1
    out.write(text)
    return 0


def _table_of(target: HostPort, doc: dict[str, Any]) -> str:
    try:
        return table(doc)
    except (TypeError, ValueError, AttributeError, OverflowError) as exc:  # a wrong value
        raise ViewError(f"http://{target}/connections answered a document this version "
                        f"cannot show ({exc}); --json prints it as it is") from None
